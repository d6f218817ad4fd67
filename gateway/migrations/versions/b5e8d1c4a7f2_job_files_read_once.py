"""What jobs wrote, read once by gateway.jobfiles: the dry run's export kept in
the database, why an export could not be read, why a file can never be released

Revision ID: b5e8d1c4a7f2
Revises: e4b7c2d9f1a6
Create Date: 2026-12-06 04:40:00.000000
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'b5e8d1c4a7f2'
down_revision = 'e4b7c2d9f1a6'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dry_run_files', sa.Text(), nullable=True))
    with op.batch_alter_table('export', schema=None) as batch_op:
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))
    with op.batch_alter_table('export_file', schema=None) as batch_op:
        batch_op.add_column(sa.Column('note', sa.String(length=255), nullable=True))


def downgrade():
    with op.batch_alter_table('export_file', schema=None) as batch_op:
        batch_op.drop_column('note')
    with op.batch_alter_table('export', schema=None) as batch_op:
        batch_op.drop_column('error')
    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.drop_column('dry_run_files')
