"""Dry runs on the synthetic twin: the dry run's Slurm job, outcome and log
per submission; the dry-run MLflow experiment and the skip flag per user

Revision ID: d7e1a9c4b2f0
Revises: c3d4e5f6a7b8
Create Date: 2026-12-01 11:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'd7e1a9c4b2f0'
down_revision = 'c3d4e5f6a7b8'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mlflow_dry_run_experiment_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('skip_dry_run', sa.Boolean(), server_default='0', nullable=False))

    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dry_run_job_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('dry_run_exit_code', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('dry_run_reason', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('dry_run_log', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_submission_dry_run_job_id'), ['dry_run_job_id'], unique=False)


def downgrade():
    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_submission_dry_run_job_id'))
        batch_op.drop_column('dry_run_log')
        batch_op.drop_column('dry_run_reason')
        batch_op.drop_column('dry_run_exit_code')
        batch_op.drop_column('dry_run_job_id')

    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('skip_dry_run')
        batch_op.drop_column('mlflow_dry_run_experiment_id')
