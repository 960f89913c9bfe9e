"""items.complete: finished items are skipped by assignment through an index

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN (SQLite supports it with a default): no table rebuild, foreign keys untouched
    op.add_column("items", sa.Column("complete", sa.Boolean, nullable=False, server_default=sa.false()))
    # Backfill: an item is complete when it has as many rankings as its campaign's overlap.
    op.execute(
        """
        UPDATE items SET complete = (
            (SELECT count(*) FROM rankings WHERE rankings.item_id = items.id)
            >= (SELECT overlap FROM campaigns WHERE campaigns.id = items.campaign_id)
        )
        """
    )
    op.create_index("ix_items_campaign_complete_id", "items", ["campaign_id", "complete", "id"])


def downgrade() -> None:
    op.drop_index("ix_items_campaign_complete_id", "items")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("complete")
