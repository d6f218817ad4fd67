"""Two tiers. Tests that use the ``testbed`` fixture (directly or through
another fixture: ``stack``, ``app``...) need the real services that `make test`
starts, and tests that use ``venv_cache`` install packages from the index: both
are marked ``integration``. The rest is `make unit`: no root, no services,
seconds.

Order: a module marked ``last`` (``pytestmark = pytest.mark.last``: it stops
the testbed's shared daemons) runs after every other test, whatever its name.
Helpers shared by tests and benches live in tests/helpers/; test modules never
import each other (tests/test_imports.py)."""
import os
from pathlib import Path

import pytest
from requests.auth import HTTPBasicAuth

from gateway import create_app
from gateway.config import from_environment
from gateway.extensions import db

from .helpers.stack import Stack, require_testbed

INTEGRATION_FIXTURES = {"testbed", "venv_cache"}


def pytest_generate_tests(metafunc):
    """``local_app`` runs on SQLite; a module with
    ``pytestmark = pytest.mark.databases("sqlite", "postgresql")`` runs its
    tests on both (PostgreSQL is the production database)."""
    if "database_url" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("databases")
        metafunc.parametrize("database_url", marker.args if marker else ("sqlite",), indirect=True)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)  # stable: file order otherwise
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("database_url") == "postgresql"
        if on_postgres or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def postgres():
    """The testbed's PostgreSQL role (it may create databases); this session's
    databases are dropped at its end."""
    from .helpers.database import Postgres

    server = Postgres.from_environment()
    yield server
    server.drop_all()


@pytest.fixture
def database_url(request, tmp_path):
    """A fresh, empty database for one test: a SQLite file, or a PostgreSQL
    database of its own (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    server = request.getfixturevalue("postgres")
    name = server.create()
    yield server.url(name)
    server.drop(name)


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
def postgres_stack(testbed, postgres):
    """A second stack, on PostgreSQL (the production database), on a database
    of its own."""
    running = Stack(M2D_SQLALCHEMY_DATABASE_URI=postgres.url(postgres.create())).start()
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
def local_app(tmp_path, database_url):
    """An app on its own fresh database (migrated), for tests of the
    database logic and the pages that need no other service."""
    import flask_migrate

    application = create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "data"),
                              "SQLALCHEMY_DATABASE_URI": database_url,
                              "REDIS_URL": "redis://127.0.0.1:1/0",  # no Redis: enqueueing must not matter
                              "SLURM_ACCOUNTS": False,  # nor Slurm's accounting (tests/test_fairshare.py)
                              # nor report jobs: tests/test_disclosure_flow.py turns them on
                              "DISCLOSURE_REPORTS": False})
    with application.app_context():
        flask_migrate.upgrade()
        yield application
        db.session.remove()
        db.engine.dispose()  # a PostgreSQL database cannot be dropped while connected


@pytest.fixture
def client(local_app):
    """A Flask test client on the local app (no Slurm, no Redis)."""
    return local_app.test_client()
