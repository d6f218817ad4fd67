"""The application factory."""
import logging
import os
import tempfile
from pathlib import Path

from flask import Flask, Request

from . import config as configuration
from . import service_account
from .core.storage import incoming_dir, secure_data_dir
from .extensions import csrf, db, limiter, login_manager, migrate
from .web import errors


class DiskRequest(Request):
    """Uploads always go to a file on disk in incoming/, never into memory
    (Werkzeug keeps bodies under 500 KB in memory by default): an anonymous
    one (O_TMPFILE), so a worker killed mid-upload leaves nothing behind, and
    one that can be linked into place (no O_EXCL, unlike tempfile's), so the
    kept upload is the parser's own copy, written once (gateway.core.intake)."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        try:
            return open(os.open(incoming_dir(), os.O_RDWR | os.O_TMPFILE, 0o600), "w+b")
        except OSError:  # a file system without O_TMPFILE (NFS): a named file, removed on close
            return tempfile.NamedTemporaryFile(dir=incoming_dir(), suffix=".part")


def create_app(config=None):
    app = Flask(__name__, instance_relative_config=True)
    app.request_class = DiskRequest
    cfg = configuration.load(app, config)
    service_account.switch_if_root(cfg["DATA_DIR"])  # an admin command run as root: before any file is written
    secure_data_dir(Path(cfg["DATA_DIR"]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if cfg["PROXY_HOPS"]:
        from werkzeug.middleware.proxy_fix import ProxyFix
        hops = cfg["PROXY_HOPS"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)

    db.init_app(app)
    migrate.init_app(app, db, directory=str(Path(__file__).parent / "migrations"))
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    csrf.init_app(app)
    limiter.init_app(app)

    if cfg["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        with app.app_context():
            _tune_sqlite(db.engine)
            db.engine.connect().close()  # create the file now, to close it to everyone else
            if db.engine.url.database:
                os.chmod(db.engine.url.database, 0o600)  # SQLite gives its WAL files the same mode

    from . import commands
    from .web import account, admin, api, auth, downloads, exports, ops, review, submissions
    app.register_blueprint(ops.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(submissions.bp)
    app.register_blueprint(account.bp)
    app.register_blueprint(exports.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(review.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(downloads.bp)
    commands.init_app(app)
    errors.init_app(app)
    _secure_headers(app)
    app.context_processor(admin.navigation)
    return app


# Scripts and styles come from the app's own /static only: no inline script
# or style, no CDN, and no framing by other sites.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _secure_headers(app):
    @app.after_request
    def headers(response):
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response


def _tune_sqlite(engine):
    """Workers, pollers and the web app write at once: WAL lets readers go on
    while one writes, and the busy timeout makes writers wait, not fail."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
