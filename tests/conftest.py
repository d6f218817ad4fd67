import pytest

from gateway import create_app
from gateway.config import from_environment
from gateway.extensions import db

from .stack import Stack


@pytest.fixture(scope="session")
def stack():
    """The gateway's processes on the real testbed, for the whole session."""
    running = Stack().start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def app(stack):
    """The stack's app, in-process, to look at its database."""
    application = create_app(from_environment(stack.env))
    with application.app_context():
        yield application
        db.session.remove()


@pytest.fixture
def tmp_zip(tmp_path):
    return tmp_path / "submission.zip"


@pytest.fixture
def local_app(tmp_path):
    """An app on its own fresh database (migrated), for tests of the
    database logic that need no other service."""
    import flask_migrate

    application = create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "data"),
                              "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'gateway.db'}",
                              "REDIS_URL": "redis://127.0.0.1:1/0"})  # no Redis: enqueueing must not matter
    with application.app_context():
        flask_migrate.upgrade()
        yield application
        db.session.remove()
