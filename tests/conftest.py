"""Two tiers. Tests that use the ``testbed`` fixture (directly or through
another fixture: ``stack``, ``app``...) need the real services that `make test`
starts, and tests that use ``venv_cache`` install packages from the index: both
are marked ``integration``. The rest is `make unit`: no root, no services,
seconds."""
import os
from pathlib import Path

import pytest
from requests.auth import HTTPBasicAuth

from gateway import create_app
from gateway.config import from_environment
from gateway.extensions import db

from .stack import Stack, require_testbed

INTEGRATION_FIXTURES = {"testbed", "venv_cache"}


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def testbed():
    """The real services (Slurm, Apptainer, Redis, MLflow, SMTP); fails, never
    skips, when `make test` did not start them."""
    env = require_testbed()
    base = Path(env["M2D_BASE_IMAGE"])
    if not base.is_file():
        pytest.fail(f"M2D_BASE_IMAGE={base} does not exist: is the testbed up?")
    return {"apptainer": env["M2D_APPTAINER"], "base": base, "slurm_conf": env["SLURM_CONF"], "env": env}


@pytest.fixture(scope="session")
def mlflow_url(testbed):
    return testbed["env"]["M2D_MLFLOW_URL"].rstrip("/")


@pytest.fixture(scope="session")
def admin_auth(testbed):
    """MLflow's admin login. HTTPBasicAuth, not a tuple: pytest prints fixture
    values in failure reports, and this keeps the password out of them."""
    return HTTPBasicAuth(os.environ.get("M2D_MLFLOW_ADMIN_USERNAME", "admin"),
                         testbed["env"]["M2D_MLFLOW_ADMIN_PASSWORD"])


@pytest.fixture(scope="session")
def stack(testbed):
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
    database logic and the pages that need no other service."""
    import flask_migrate

    application = create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "data"),
                              "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'gateway.db'}",
                              "REDIS_URL": "redis://127.0.0.1:1/0"})  # no Redis: enqueueing must not matter
    with application.app_context():
        flask_migrate.upgrade()
        yield application
        db.session.remove()


@pytest.fixture
def client(local_app):
    """A Flask test client on the local app (no Slurm, no Redis)."""
    return local_app.test_client()
