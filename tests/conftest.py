"""Two tiers. Tests that use the ``testbed`` fixture (directly or through
another fixture: ``stack``, ``app``...) need the real services that `make test`
starts, and tests that use ``venv_cache`` install packages from the index: both
are marked ``integration``. The rest is `make unit`: no root, no services,
seconds.

Helpers shared by tests and benches live in tests/helpers/; test modules never
import each other (tests/test_imports.py).

In parallel (`make test`: pytest-xdist, ``--dist loadgroup``): each worker is a
session with its own stack; the tests of a module that share a module-scoped
fixture (a stack, a submission followed to its end) form one group, so that
fixture is made once, and the rest are spread one by one. The longest
(tests/durations.json) are handed out first, so none starts last, each to the
first worker free (tests/helpers/scheduling.py)."""
import functools
import json
import os
import shutil
from pathlib import Path

import pytest
from requests.auth import HTTPBasicAuth
from werkzeug import security

from gateway import create_app
from gateway.config import from_environment
from gateway.core import models
from gateway.extensions import db

from .helpers.scheduling import LongestFirst
from .helpers.stack import Stack, require_testbed

INTEGRATION_FIXTURES = {"testbed", "venv_cache"}


DURATIONS = Path(__file__).with_name("durations.json")  # tests/helpers/durations.py writes it
SHARED_SCOPES = {"module", "class", "package"}


def pytest_generate_tests(metafunc):
    """``local_app`` runs on SQLite; a module with
    ``pytestmark = pytest.mark.databases("sqlite", "postgresql")`` runs its
    tests on both (PostgreSQL is the production database)."""
    if "database" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("databases")
        metafunc.parametrize("database", marker.args if marker else ("sqlite",), indirect=True)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("database") == "postgresql"
        if on_postgres or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if _shares_a_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items[:] = _longest_first(items)


@pytest.hookimpl(optionalhook=True)  # xdist's hook: pytest -p no:xdist still runs
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadgroup":
        return LongestFirst(config, log)
    return None


def _shares_a_fixture(item):
    """Whether ``item`` uses a fixture made once for its module (or class), or a
    session-wide one its module defines (test_m2d_cli's virtualenv cache): made
    once per worker, so its tests had better meet on one."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        fixture.scope in SHARED_SCOPES or (fixture.scope == "session" and fixture.func.__module__ == item.module.__name__)
        for fixture in (definitions[-1] for definitions in info.name2fixturedefs.values()))


def _longest_first(items):
    """The units xdist hands out (an xdist group, or one test) by their recorded
    seconds, longest first; those with no record keep their file order after."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    units, seconds = {}, {}
    for item in items:
        group = item.get_closest_marker("xdist_group")
        unit = group.args[0] if group else item.nodeid
        units.setdefault(unit, []).append(item)
        seconds[unit] = seconds.get(unit, 0) + known.get(item.nodeid, 0)
    order = sorted(units, key=lambda unit: -seconds[unit])  # stable: file order among equals
    return [item for unit in order for item in units[unit]]


@pytest.fixture(scope="session")
def postgres():
    """The testbed's PostgreSQL role (it may create databases); this session's
    databases are dropped at its end."""
    from .helpers.database import Postgres

    server = Postgres.from_environment()
    yield server
    server.drop_all()


@pytest.fixture
def database(request):
    """Which database a test runs on: ``sqlite`` or ``postgresql``."""
    return request.param


@pytest.fixture
def database_url(request, database, tmp_path):
    """A fresh, empty database for one test: a SQLite file, or a PostgreSQL
    database of its own (dropped after)."""
    if database == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    server = request.getfixturevalue("postgres")
    name = server.create()
    yield server.url(name)
    server.drop(name)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory):
    """A SQLite database migrated to the head once per session: each test's
    is a copy (the migrations took ~0.3 s a test, most of `make unit`'s setup)."""
    path = tmp_path_factory.mktemp("migrated") / "gateway.db"
    _migrate(f"sqlite:///{path}", path.parent)
    return path


@pytest.fixture(scope="session")
def migrated_postgres(postgres, tmp_path_factory):
    """The PostgreSQL counterpart: a database migrated once, the template of each test's."""
    name = postgres.create()
    _migrate(postgres.url(name), tmp_path_factory.mktemp("migrated-pg"))
    return name


@pytest.fixture
def migrated_database_url(request, database, tmp_path):
    """A database of its own for one test, already at the migrations' head."""
    if database == "sqlite":
        path = tmp_path / "gateway.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite"), path)
        yield f"sqlite:///{path}"
        return
    server = request.getfixturevalue("postgres")
    name = server.create(template=request.getfixturevalue("migrated_postgres"))
    yield server.url(name)
    server.drop(name)


def _migrate(url, folder):
    import flask_migrate

    application = create_app(_local_settings(url, folder))
    with application.app_context():
        flask_migrate.upgrade()
        db.session.remove()
        db.engine.dispose()  # a template database must have no connections


def _local_settings(url, folder):
    return {"TESTING": True, "DATA_DIR": str(folder / "data"), "SQLALCHEMY_DATABASE_URI": url,
            "REDIS_URL": "redis://127.0.0.1:1/0",  # no Redis: enqueueing must not matter
            "SLURM_ACCOUNTS": False,  # nor Slurm's accounting (tests/test_fairshare.py)
            "DISCLOSURE_REPORTS": False}  # nor report jobs: tests/test_disclosure_flow.py turns them on


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
def local_app(tmp_path, migrated_database_url, monkeypatch):
    """An app on its own fresh database (migrated), for tests of the
    database logic and the pages that need no other service. Its web passwords
    are hashed with one round, not scrypt: werkzeug's hash (0.1 s a call here) was a
    fifth of `make unit`; check_password_hash reads the method from each hash, and
    the stacks (tests of logins) keep the real one."""
    monkeypatch.setattr(models, "generate_password_hash", functools.partial(
        security.generate_password_hash, method="pbkdf2:sha256:1"))
    application = create_app(_local_settings(migrated_database_url, tmp_path))
    with application.app_context():
        yield application
        db.session.remove()
        db.engine.dispose()  # a PostgreSQL database cannot be dropped while connected


@pytest.fixture
def client(local_app):
    """A Flask test client on the local app (no Slurm, no Redis)."""
    return local_app.test_client()
