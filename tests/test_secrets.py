"""MLflow passwords are encrypted at rest: the database holds only ciphertext,
the key lives in the secrets folder (0600), and every reader gets plain text."""
import sqlite3
import stat

import flask_migrate
import pytest
from sqlalchemy import text

from gateway import create_app, secrets
from gateway.core import accounts
from gateway.core.models import ApiToken, User, utcnow
from gateway.extensions import db

PASSWORD = "plain-mlflow-password-0123456789"
# the migration that encrypts, and the one before it (later ones may follow)
BEFORE, ENCRYPTED = "7cd99977131a", "409ca9701daf"


def raw_password_column(database, email):
    with sqlite3.connect(database) as conn:
        return conn.execute("SELECT mlflow_password_encrypted FROM user WHERE email = ?", (email,)).fetchone()[0]


@pytest.fixture
def researcher(local_app):
    user = accounts.create_user("carol@example.org", "Carol")
    user.approved_at = utcnow()
    user.mlflow_username = accounts.mlflow_username_for(user)
    user.mlflow_password = PASSWORD
    db.session.commit()
    return user


def test_the_column_holds_ciphertext_and_the_model_reads_plain_text(local_app, researcher):
    raw = raw_password_column(local_app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///"),
                              researcher.email)
    assert raw and PASSWORD not in raw
    db.session.expire_all()
    assert User.query.filter_by(email=researcher.email).one().mlflow_password == PASSWORD


def test_the_key_is_made_on_first_use_mode_0600_in_the_secrets_folder(local_app, researcher):
    path = secrets.key_path(local_app.config)
    assert str(path.parent) == local_app.config["SECRETS_DIR"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = path.read_bytes()
    researcher.mlflow_password = "another"  # a second write keeps the key
    assert path.read_bytes() == first


def test_the_api_and_the_account_page_show_the_plain_password(client, researcher):
    token = ApiToken.issue(researcher)
    db.session.commit()
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json
    assert me["mlflow"]["password"] == PASSWORD
    with client.session_transaction() as session:
        session["_user_id"] = str(researcher.id)
        session["_fresh"] = True
    assert PASSWORD in client.get("/account").get_data(as_text=True)


def test_a_missing_key_is_an_error_that_names_the_setting_not_a_new_key(local_app, researcher):
    path = secrets.key_path(local_app.config)
    path.unlink()
    db.session.expire_all()
    with pytest.raises(secrets.SecretsError, match="M2D_SECRETS_DIR"):
        db.session.get(User, researcher.id).mlflow_password  # noqa: B018
    assert not path.exists()


def test_a_replaced_key_is_an_error_that_says_how_to_recover(local_app, researcher):
    path = secrets.key_path(local_app.config)
    path.unlink()
    secrets.encrypt("something", local_app.config)  # a new key
    db.session.expire_all()
    with pytest.raises(secrets.SecretsError, match="users approve"):
        db.session.get(User, researcher.id).mlflow_password  # noqa: B018


def test_migration_encrypts_existing_passwords_and_downgrade_restores_them(tmp_path):
    database = tmp_path / "gateway.db"
    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "data"),
                      "SQLALCHEMY_DATABASE_URI": f"sqlite:///{database}", "REDIS_URL": "redis://127.0.0.1:1/0"})
    with app.app_context():
        flask_migrate.upgrade(revision=BEFORE)
        db.session.execute(text("INSERT INTO user (email, name, is_admin, created_at, mlflow_password) "
                                "VALUES ('old@example.org', 'Old', 0, '2026-01-01', :p)"), {"p": PASSWORD})
        db.session.commit()

        flask_migrate.upgrade(revision=ENCRYPTED)
        raw = raw_password_column(database, "old@example.org")
        assert raw and PASSWORD not in raw
        assert stat.S_IMODE(secrets.key_path(app.config).stat().st_mode) == 0o600
        assert secrets.decrypt(raw) == PASSWORD
        indexes = {row[1] for row in db.session.execute(text("PRAGMA index_list('submission')"))}
        assert "ix_submission_user_id_created_at" in indexes
        db.session.remove()

        flask_migrate.downgrade(revision=BEFORE)  # one step
        with sqlite3.connect(database) as conn:
            assert conn.execute("SELECT mlflow_password FROM user").fetchone()[0] == PASSWORD

        flask_migrate.upgrade()  # and on to the head
        raw = raw_password_column(database, "old@example.org")
        assert raw and PASSWORD not in raw
        assert User.query.filter_by(email="old@example.org").one().mlflow_password == PASSWORD
        db.session.remove()


def test_on_the_stack_the_database_holds_no_password_and_me_returns_it(stack, app):
    alice = stack.researcher("sealed")
    password = alice.me()["mlflow"]["password"]
    assert len(password) >= 16
    raw = raw_password_column(app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///"), alice.address)
    assert raw and password not in raw
    for file in (stack.root / "data").glob("gateway.db*"):  # the WAL too
        assert password.encode() not in file.read_bytes(), file
    key = secrets.key_path(app.config)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
