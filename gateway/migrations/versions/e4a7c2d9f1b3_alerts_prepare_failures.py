"""Alerts (stuck submissions, prepares that kept failing) and their emails;
failed prepares per submission

Revision ID: e4a7c2d9f1b3
Revises: d7e1a9c4b2f0
Create Date: 2026-12-03 13:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'e4a7c2d9f1b3'
down_revision = 'd7e1a9c4b2f0'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('alert',
                    sa.Column('id', sa.Integer(), nullable=False),
                    sa.Column('submission_id', sa.Integer(), nullable=False),
                    sa.Column('kind', sa.String(length=20), nullable=False),
                    sa.Column('status', sa.String(length=20), nullable=False),
                    sa.Column('since', sa.DateTime(), nullable=False),
                    sa.Column('raised_at', sa.DateTime(), nullable=False),
                    sa.Column('detail', sa.Text(), nullable=False),
                    sa.ForeignKeyConstraint(['submission_id'], ['submission.id'], name=op.f('fk_alert_submission_id_submission')),
                    sa.PrimaryKeyConstraint('id', name=op.f('pk_alert')),
                    sa.UniqueConstraint('submission_id', 'kind', 'since', name='uq_alert_submission_id_kind_since'))
    with op.batch_alter_table('alert', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alert_submission_id'), ['submission_id'], unique=False)

    with op.batch_alter_table('email', schema=None) as batch_op:
        batch_op.add_column(sa.Column('alert_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_email_alert_id_alert'), 'alert', ['alert_id'], ['id'])

    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.add_column(sa.Column('prepare_failures', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('prepare_failed_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('prepare_error', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('submission', schema=None) as batch_op:
        batch_op.drop_column('prepare_error')
        batch_op.drop_column('prepare_failed_at')
        batch_op.drop_column('prepare_failures')

    with op.batch_alter_table('email', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_email_alert_id_alert'), type_='foreignkey')
        batch_op.drop_column('alert_id')

    with op.batch_alter_table('alert', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alert_submission_id'))

    op.drop_table('alert')
