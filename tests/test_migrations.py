"""The Alembic migrations on both databases: from empty to head, one step
down and back up, and no drift between the models and the migrated schema."""
import flask_migrate
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gateway import create_app
from gateway.extensions import db

pytestmark = pytest.mark.databases("sqlite", "postgresql")


def _app(tmp_path, url):
    return create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "data"),
                       "SQLALCHEMY_DATABASE_URI": url, "REDIS_URL": "redis://127.0.0.1:1/0"})


def _revision():
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _drift():
    with db.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), db.metadata)


def test_migrations_go_up_from_empty_one_step_down_and_up_again_without_drift(tmp_path, database_url):
    application = _app(tmp_path, database_url)
    with application.app_context():
        try:
            flask_migrate.upgrade()
            head = _revision()
            assert head and _drift() == []
            flask_migrate.downgrade(revision="-1")
            assert _revision() not in (None, head)
            flask_migrate.upgrade()
            assert _revision() == head and _drift() == []
        finally:
            db.session.remove()
            db.engine.dispose()
