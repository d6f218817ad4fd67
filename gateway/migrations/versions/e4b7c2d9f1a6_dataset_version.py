"""The dataset version a submission's jobs ran on (its twin's in the dry run)

Revision ID: e4b7c2d9f1a6
Revises: e4a7c2d9f1b3
Create Date: 2026-12-03 13:40:00.000000
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'e4b7c2d9f1a6'
down_revision = 'e4a7c2d9f1b3'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dataset_version', sa.String(length=64), nullable=True))


def downgrade():
    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.drop_column('dataset_version')
