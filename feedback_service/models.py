"""Database rows (SQLAlchemy 2). The API never returns these directly: see ``schemas.py``.

Times are naive UTC everywhere (SQLite keeps no zone); ``schemas`` adds the zone on the way out.
The schema itself is created by the Alembic migrations in ``migrations/``; keep them in step.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, false, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# BigInteger on PostgreSQL, INTEGER (rowid alias, autoincrement) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # "admin" | "labeler"
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the token itself is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell tokens apart in listings
    created_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    labeler: Mapped[Labeler] = relationship()


class Campaign(Base):
    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    guidelines: Mapped[str] = mapped_column(Text)
    overlap: Mapped[int] = mapped_column(Integer)  # how many labelers must rank each item
    lease_seconds: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("campaign_id", "content_hash", name="uq_items_campaign_hash"),
        Index("ix_items_campaign_complete_id", "campaign_id", "complete", "id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    prompt: Mapped[str] = mapped_column(Text)  # the prompt, or the last user turn of a chat history
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)  # chat history, if any
    gold_answer_id: Mapped[int | None] = mapped_column(BigId, nullable=True)  # known best answer (quality control)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # Set once the item has `overlap` rankings (rankings are final), so assignment skips finished
    # items through an index instead of counting their assignments (migration 0003).
    complete: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    answers: Mapped[list["Answer"]] = relationship(order_by="Answer.position", lazy="selectin")


class Answer(Base):
    __tablename__ = "answers"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    model_id: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    sampling: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # temperature, top_p, seed, ...


class Assignment(Base):
    """A labeler's claim on an item. ``leased`` counts against overlap until ``expires_at``."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "labeler_id", name="uq_assignments_item_labeler"),
        Index("ix_assignments_labeler_campaign_status", "labeler_id", "campaign_id", "status"),  # migration 0004
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))  # indexed by uq_assignments_item_labeler
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"))
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))  # "leased" | "done" | "skipped"
    leased_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class Ranking(Base):
    """One labeler's full order of one item's answers. ``id`` doubles as the export watermark."""

    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("item_id", "labeler_id", name="uq_rankings_item_labeler"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))  # indexed by uq_rankings_item_labeler
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    ranking: Mapped[list[list[int]]] = mapped_column(JSON)  # tie groups of answer ids, best first
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Export(Base):
    """An immutable, versioned snapshot of preference pairs (migration 0002)."""

    __tablename__ = "exports"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    since_watermark: Mapped[int] = mapped_column(BigInteger)
    watermark: Mapped[int] = mapped_column(BigInteger)
    row_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ExportRow(Base):
    __tablename__ = "export_rows"
    export_id: Mapped[int] = mapped_column(ForeignKey("exports.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    row: Mapped[dict[str, Any]] = mapped_column(JSON)
