"""Merge the portal's and the airlock's revisions

Revision ID: c3d4e5f6a7b8
Revises: 5b1e2c7d9a31, a08c8e1ecc19
Create Date: 2026-12-01 10:30:00.000000
"""

# revision identifiers, used by Alembic.
revision = 'c3d4e5f6a7b8'
down_revision = ('5b1e2c7d9a31', 'a08c8e1ecc19')
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
