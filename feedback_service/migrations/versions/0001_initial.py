"""initial schema: labelers, tokens, campaigns, items, answers, assignments, rankings

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "labelers",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("labeler_id", BigId, sa.ForeignKey("labelers.id"), nullable=False, index=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("revoked_at", sa.DateTime, nullable=True),
    )
    op.create_table(
        "campaigns",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("guidelines", sa.Text, nullable=False),
        sa.Column("overlap", sa.Integer, nullable=False),
        sa.Column("lease_seconds", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "items",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id"), nullable=False, index=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("messages", sa.JSON, nullable=True),
        sa.Column("gold_answer_id", BigId, nullable=True),
        sa.Column("meta", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("campaign_id", "content_hash", name="uq_items_campaign_hash"),
    )
    op.create_table(
        "answers",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("item_id", BigId, sa.ForeignKey("items.id"), nullable=False, index=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("model_id", sa.String(256), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=True),
        sa.Column("sampling", sa.JSON, nullable=True),
    )
    op.create_table(
        "assignments",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("item_id", BigId, sa.ForeignKey("items.id"), nullable=False, index=True),
        sa.Column("labeler_id", BigId, sa.ForeignKey("labelers.id"), nullable=False),
        sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id"), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("leased_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("item_id", "labeler_id", name="uq_assignments_item_labeler"),
    )
    op.create_index("ix_assignments_labeler_status", "assignments", ["labeler_id", "status"])
    op.create_table(
        "rankings",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("item_id", BigId, sa.ForeignKey("items.id"), nullable=False, index=True),
        sa.Column("labeler_id", BigId, sa.ForeignKey("labelers.id"), nullable=False, index=True),
        sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id"), nullable=False, index=True),
        sa.Column("ranking", sa.JSON, nullable=False),
        sa.Column("rationale", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("item_id", "labeler_id", name="uq_rankings_item_labeler"),
    )


def downgrade() -> None:
    for table in ("rankings", "assignments", "answers", "items", "campaigns", "api_tokens", "labelers"):
        op.drop_table(table)
