"""assignments (labeler_id, campaign_id, status): the lease a labeler holds in a campaign, found
without scanning the campaign's assignments (asked on every `next`)

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_assignments_labeler_campaign_status", "assignments", ["labeler_id", "campaign_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_assignments_labeler_campaign_status", "assignments")
