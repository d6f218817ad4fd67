"""Error responses, in one place: JSON under /api, the site's own page elsewhere."""
from __future__ import annotations

from flask import Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

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


def init_app(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if isinstance(exc, RequestEntityTooLarge):
            code, message = "too_large", too_large_message()
        else:
            code, message = exc.name.lower().replace(" ", "_"), exc.description
        if request.path.startswith(API_PREFIX):
            return json_error(exc.code, code, message)
        return render_template("error.html", title=exc.name, message=message), exc.code
