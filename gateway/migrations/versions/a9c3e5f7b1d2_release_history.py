"""Release history: every file a researcher was given, with its hash, report and
what later releases are compared with (differencing across releases)

Revision ID: a9c3e5f7b1d2
Revises: b5e8d1c4a7f2
Create Date: 2026-12-06 08:10:00.000000
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'a9c3e5f7b1d2'
down_revision = 'b5e8d1c4a7f2'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'released_file',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('submission_id', sa.Integer(), nullable=False),
        sa.Column('item_id', sa.Integer(), nullable=False),
        sa.Column('path', sa.String(length=1024), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('released_sha256', sa.String(length=64), nullable=False),
        sa.Column('released_size', sa.BigInteger(), nullable=False),
        sa.Column('kind', sa.String(length=40), nullable=True),
        sa.Column('report', sa.Text(), nullable=True),
        sa.Column('sketch', sa.Text(), nullable=True),
        sa.Column('released_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['item_id'], ['release_item.id'], ),
        sa.ForeignKeyConstraint(['submission_id'], ['submission.id'], ),
        sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('item_id'),
    )
    with op.batch_alter_table('released_file', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_released_file_user_id'), ['user_id'], unique=False)


def downgrade():
    with op.batch_alter_table('released_file', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_released_file_user_id'))
    op.drop_table('released_file')
