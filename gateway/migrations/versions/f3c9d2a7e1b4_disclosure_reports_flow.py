"""Disclosure control: each submission's report (the sealed job that made it,
its JSON, its SACRO results) and each manifest file's verdict and checks

Revision ID: f3c9d2a7e1b4
Revises: a9c3e5f7b1d2
Create Date: 2026-12-06 08:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'f3c9d2a7e1b4'
down_revision = 'a9c3e5f7b1d2'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'disclosure_report',
        sa.Column('submission_id', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('slurm_job_id', sa.String(length=32), nullable=True),
        sa.Column('checker_sha256', sa.String(length=64), nullable=True),
        sa.Column('image_digest', sa.String(length=80), nullable=True),
        sa.Column('index_version', sa.String(length=128), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('report', sa.Text(), nullable=True),
        sa.Column('acro', sa.Text(), nullable=True),
        sa.Column('requested_at', sa.DateTime(), nullable=False),
        sa.Column('submitted_at', sa.DateTime(), nullable=True),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['submission_id'], ['submission.id']),
        sa.PrimaryKeyConstraint('submission_id'),
    )
    with op.batch_alter_table('disclosure_report', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_disclosure_report_status'), ['status'], unique=False)
    op.create_table(
        'disclosure_file',
        sa.Column('file_id', sa.Integer(), nullable=False),
        sa.Column('submission_id', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=10), nullable=False),
        sa.Column('type', sa.String(length=40), nullable=True),
        sa.Column('checks', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(['file_id'], ['export_file.id']),
        sa.ForeignKeyConstraint(['submission_id'], ['disclosure_report.submission_id']),
        sa.PrimaryKeyConstraint('file_id'),
    )
    with op.batch_alter_table('disclosure_file', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_disclosure_file_submission_id'), ['submission_id'], unique=False)


def downgrade():
    with op.batch_alter_table('disclosure_file', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_disclosure_file_submission_id'))
    op.drop_table('disclosure_file')
    with op.batch_alter_table('disclosure_report', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_disclosure_report_status'))
    op.drop_table('disclosure_report')
