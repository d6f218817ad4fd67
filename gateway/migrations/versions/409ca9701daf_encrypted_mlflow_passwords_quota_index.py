"""MLflow passwords encrypted at rest; an index for the daily submission quota

Revision ID: 409ca9701daf
Revises: 7cd99977131a
Create Date: 2026-11-28 10:00:00.000000

The column is renamed as well as rewritten, so that no code (and no reader of
a database dump) can take the ciphertext for the password. The key is the
gateway's (gateway/secrets.py, M2D_SECRETS_DIR/mlflow-key): upgrading a
database that holds passwords creates it if missing; downgrading needs it.
"""
from alembic import op
import sqlalchemy as sa
from flask import current_app

from gateway import secrets


# revision identifiers, used by Alembic.
revision = '409ca9701daf'
down_revision = '7cd99977131a'
branch_labels = None
depends_on = None

user = sa.table('user', sa.column('id', sa.Integer), sa.column('mlflow_password', sa.String),
                sa.column('mlflow_password_encrypted', sa.String))


def _rewrite(source, target, convert):
    connection = op.get_bind()
    rows = connection.execute(sa.select(user.c.id, user.c[source]).where(user.c[source].isnot(None))).all()
    for user_id, value in rows:
        connection.execute(user.update().where(user.c.id == user_id).values({target: convert(value)}))


def upgrade():
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mlflow_password_encrypted', sa.String(length=255), nullable=True))
    _rewrite('mlflow_password', 'mlflow_password_encrypted',
             lambda plain: secrets.encrypt(plain, current_app.config))
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('mlflow_password')

    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.create_index('ix_submission_user_id_created_at', ['user_id', 'created_at'], unique=False)


def downgrade():
    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.drop_index('ix_submission_user_id_created_at')

    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mlflow_password', sa.String(length=255), nullable=True))
    _rewrite('mlflow_password_encrypted', 'mlflow_password',
             lambda token: secrets.decrypt(token, current_app.config))
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('mlflow_password_encrypted')
