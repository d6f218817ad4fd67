"""Error responses, in one place: JSON under /api, the site's own page elsewhere."""
from __future__ import annotations

from flask import Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge

API_PREFIX = "/api/"


def json_error(status: int, code: str, message: str) -> Response:
    """``{"error": code, "message": what to do}`` with ``status``."""
    response = jsonify(error=code, message=message)
    response.status_code = status
    return response


def too_large_message() -> str:
    limit = current_app.config["MAX_ZIP_BYTES"] // 1024**2
    return (f"The upload is larger than {limit} MB. Leave data and model weights out of the "
            "zip: the dataset is at /mnt/dataset in the job.")


# What the site's error pages say (the API keeps Werkzeug's descriptions).
PAGE_MESSAGES = {
    403: "This page is for admins only.",
    404: "There is nothing here. If you followed a link to a submission, it may belong to "
         "another account.",
    429: "Too many attempts. Wait a minute, then try again.",
    500: "Something went wrong on our side. It has been logged; try again in a minute.",
}


def init_app(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if isinstance(exc, RequestEntityTooLarge):
            code, message = "too_large", too_large_message()
        elif exc.code == 429:
            code, message = "too_many_requests", PAGE_MESSAGES[429]
        elif not request.path.startswith(API_PREFIX) and exc.code in PAGE_MESSAGES and (
                isinstance(exc, InternalServerError) or exc.description == type(exc).description):
            code, message = "", PAGE_MESSAGES[exc.code]
        else:
            code, message = exc.name.lower().replace(" ", "_"), exc.description
        if request.path.startswith(API_PREFIX):
            return json_error(exc.code, code, message)
        if exc.code >= 500:
            from ..extensions import db
            db.session.rollback()  # the page loads the user: not in a failed transaction
        return render_template("error.html", title=exc.name, message=message), exc.code
