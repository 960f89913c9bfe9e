"""versioned exports: exports and their immutable rows

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "exports",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id"), nullable=False, index=True),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("since_watermark", sa.BigInteger, nullable=False),
        sa.Column("watermark", sa.BigInteger, nullable=False),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "export_rows",
        sa.Column("export_id", BigId, sa.ForeignKey("exports.id"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("row", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("export_rows")
    op.drop_table("exports")
