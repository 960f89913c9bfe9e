"""PostgreSQL: no planner statistics for items.complete, so the lease query always walks the open
items of the campaign through ix_items_campaign_complete_id. SQLite: nothing.

The statistics of items.complete are taken when a campaign's items are imported (the import
runs ANALYZE: every item open) and then lag behind the labeling until autovacuum analyzes the
table again. With them saying "every item open", the planner walks items_pkey from the lowest id
and filters out every finished item one by one: tens of thousands of rows per lease, later in a
campaign (one new ranking's worth per lease, for the first minutes after an import). Without
statistics it takes half the rows as open and always prefers the index that holds only the open
items in id order, which is never worse for this query; no other query filters on the column.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE items ALTER COLUMN complete SET STATISTICS 0")
    # Statistics gathered before stay until removed: a change of the column to its own type
    # removes them (no table rewrite, indexes kept).
    op.execute("ALTER TABLE items ALTER COLUMN complete TYPE boolean")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE items ALTER COLUMN complete SET STATISTICS -1")
