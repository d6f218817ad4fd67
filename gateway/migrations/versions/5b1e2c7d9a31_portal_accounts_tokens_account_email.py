"""Web portal: sign-up details, verification, rejection and disabling of
accounts; named, revocable API tokens; emails about accounts

Revision ID: 5b1e2c7d9a31
Revises: 409ca9701daf
Create Date: 2026-12-01 10:00:00.000000

Users approved before this revision (from the command line) count as
verified: their admin vouched for the address.
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '5b1e2c7d9a31'
down_revision = '409ca9701daf'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('affiliation', sa.String(length=200), server_default='', nullable=False))
        batch_op.add_column(sa.Column('intended_use', sa.Text(), server_default='', nullable=False))
        batch_op.add_column(sa.Column('email_verified_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('rejected_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('rejection_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('disabled_at', sa.DateTime(), nullable=True))
    op.execute('UPDATE "user" SET email_verified_at = approved_at WHERE approved_at IS NOT NULL')

    with op.batch_alter_table('api_token', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=100), server_default='', nullable=False))
        batch_op.add_column(sa.Column('revoked_at', sa.DateTime(), nullable=True))

    op.create_table(
        'account_email',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('key', sa.String(length=100), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('claimed_at', sa.DateTime(), nullable=True),
        sa.Column('sent_at', sa.DateTime(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['user_id'], ['user.id'], name=op.f('fk_account_email_user_id_user')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_account_email')),
        sa.UniqueConstraint('key', name=op.f('uq_account_email_key')),
    )
    with op.batch_alter_table('account_email', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_account_email_user_id'), ['user_id'], unique=False)


def downgrade():
    with op.batch_alter_table('account_email', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_account_email_user_id'))
    op.drop_table('account_email')
    with op.batch_alter_table('api_token', schema=None) as batch_op:
        batch_op.drop_column('revoked_at')
        batch_op.drop_column('name')
    with op.batch_alter_table('user', schema=None) as batch_op:
        for column in ('disabled_at', 'rejection_reason', 'rejected_at', 'email_verified_at',
                       'intended_use', 'affiliation'):
            batch_op.drop_column(column)
