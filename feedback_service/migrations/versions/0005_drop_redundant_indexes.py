"""drop indexes that others cover: assignments(item_id) and rankings(item_id) are the first
column of their (item_id, labeler_id) unique constraints, and assignments(labeler_id, status) is
served by (labeler_id, campaign_id, status) since 0004. Fewer indexes to update on every lease
and ranking.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_assignments_item_id", "assignments")
    op.drop_index("ix_assignments_labeler_status", "assignments")
    op.drop_index("ix_rankings_item_id", "rankings")


def downgrade() -> None:
    op.create_index("ix_rankings_item_id", "rankings", ["item_id"])
    op.create_index("ix_assignments_labeler_status", "assignments", ["labeler_id", "status"])
    op.create_index("ix_assignments_item_id", "assignments", ["item_id"])
