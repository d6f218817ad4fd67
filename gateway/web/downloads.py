"""The gateway serves its own client: /client says how to install it, and
/download/m2d-<version>-py3-none-any.whl is the wheel (gateway/client_wheel.py),
so `pip install <that URL>` is the whole install. Public: the client holds
nothing secret, and pip sends no login."""
from flask import Blueprint, Response, abort, render_template, request, url_for

from m2d.contract import __version__

from .. import client_wheel

bp = Blueprint("downloads", __name__)


@bp.get("/client")
def client_page():
    wheel = client_wheel.file_name()
    return render_template("client.html", version=__version__, wheel_url=url_for(
        "downloads.wheel", name=wheel, _external=True), gateway_url=request.url_root.rstrip("/"))


@bp.get("/download/<name>")
def wheel(name):
    built = client_wheel.build()
    if name != built.name:
        abort(404, description=f"This gateway serves m2d {__version__}: /download/{built.name} "
                               "(its page /client says how to install it).")
    response = Response(built.data, mimetype="application/octet-stream")
    response.headers["Content-Disposition"] = f"attachment; filename={built.name}"
    response.headers["ETag"] = f'"{built.sha256}"'
    response.headers["X-Content-SHA256"] = built.sha256
    return response
