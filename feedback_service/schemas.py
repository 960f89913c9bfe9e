"""API contract: separate Create (input, strict) and Public (output) models; never the raw rows.

Inputs forbid unknown fields, bound every length and number, and refuse strings that a database
cannot store (NUL, lone surrogates), so malformed input is a 422, never a 500.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, model_validator

MAX_ANSWERS = 16
MAX_TEXT = 100_000
DB_INT_MAX = 2**31 - 1


def _storable(s: str) -> str:
    if "\x00" in s:
        raise ValueError("string must not contain NUL (\\u0000) characters")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("string is not valid UTF-8 (lone surrogate)") from e
    return s


def _utc(dt: datetime) -> str:
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).isoformat()


Str = Annotated[str, AfterValidator(_storable)]
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.:@-]*$"), AfterValidator(_storable)]
Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_storable)]
NonEmptyText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT), AfterValidator(_storable)]
Scalar = Annotated[str, Field(max_length=1024), AfterValidator(_storable)] | bool | Annotated[int, Field(ge=-(2**53), le=2**53)] | Annotated[float, Field(allow_inf_nan=False)] | None
Key = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_storable)]
Id = Annotated[int, Field(ge=1, le=DB_INT_MAX)]
UtcDatetime = Annotated[datetime, PlainSerializer(_utc, return_type=str)]
Role = Literal["admin", "labeler"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- labelers and tokens -------------------------------------------------------------------


class LabelerCreate(Strict):
    name: Name
    role: Role = "labeler"


class LabelerPublic(BaseModel):
    id: int
    name: str
    role: Role
    active: bool
    created_at: UtcDatetime


class TokenPublic(BaseModel):
    id: int
    labeler_id: int
    prefix: str
    created_at: UtcDatetime
    revoked_at: UtcDatetime | None


class TokenCreated(BaseModel):
    """The only response that carries a token in clear; it is not stored and cannot be shown again."""

    token: str
    token_id: int
    labeler: LabelerPublic


# ---- campaigns -----------------------------------------------------------------------------


class CampaignCreate(Strict):
    name: Name
    guidelines: Text = ""
    overlap: Annotated[int, Field(ge=1, le=50, description="how many labelers must rank each item")] = 1
    lease_seconds: Annotated[int, Field(ge=5, le=7 * 86400, description="lease of an assigned item")] | None = None


class CampaignPublic(BaseModel):
    id: int
    name: str
    guidelines: str
    overlap: int
    lease_seconds: int
    created_at: UtcDatetime


# ---- items ---------------------------------------------------------------------------------


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class AnswerCreate(Strict):
    text: NonEmptyText
    model_id: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_storable)]
    model_version: Annotated[str, Field(max_length=128), AfterValidator(_storable)] | None = None
    sampling: Annotated[dict[Key, Scalar], Field(max_length=32)] | None = Field(
        default=None, description="sampling settings, e.g. {temperature, top_p, seed}"
    )


class ItemCreate(Strict):
    """A prompt *or* a chat history ending with a user turn, and 2..K candidate answers."""

    prompt: NonEmptyText | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=200)] | None = None
    answers: Annotated[list[AnswerCreate], Field(min_length=2, max_length=MAX_ANSWERS)]
    gold_best: Annotated[int, Field(ge=0, lt=MAX_ANSWERS, description="index of the known best answer (gold item)")] | None = None
    meta: Annotated[dict[Key, Scalar], Field(max_length=32)] | None = None

    @model_validator(mode="after")
    def _check(self) -> "ItemCreate":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("'messages' must end with a user turn")
        if self.gold_best is not None and self.gold_best >= len(self.answers):
            raise ValueError(f"gold_best={self.gold_best} but the item has {len(self.answers)} answers (0-based index)")
        return self


class AnswerPublic(BaseModel):
    id: int
    text: str
    model_id: str
    model_version: str | None
    sampling: dict[str, Any] | None


class ItemPublic(BaseModel):
    """What a labeler sees: no gold answer, no metadata."""

    id: int
    campaign_id: int
    prompt: str
    messages: list[dict[str, Any]] | None
    answers: list[AnswerPublic]
    created_at: UtcDatetime


class ItemAdminPublic(ItemPublic):
    content_hash: str
    gold_answer_id: int | None
    meta: dict[str, Any] | None


class ItemsImported(BaseModel):
    created: int
    duplicates: int
    item_ids: list[int] = Field(description="ids in input order; a duplicate gives the id already stored")


# ---- assignment and rankings ---------------------------------------------------------------


class AssignmentPublic(BaseModel):
    assignment_id: int
    campaign_id: int
    lease_expires_at: UtcDatetime
    item: ItemPublic


class LeaseBatch(BaseModel):
    leases: list[AssignmentPublic] = Field(description="the leases held in the campaign, oldest first; empty when nothing is left")


class RankingCreate(Strict):
    ranking: Annotated[list[Id | Annotated[list[Id], Field(min_length=1, max_length=MAX_ANSWERS)]], Field(min_length=1, max_length=MAX_ANSWERS)] = Field(
        description="the item's answer ids best first; a nested list is a tie group, e.g. [[12], [10, 11]]"
    )
    rationale: Annotated[str, Field(max_length=10_000), AfterValidator(_storable)] | None = None

    def groups(self) -> list[list[int]]:
        return [g if isinstance(g, list) else [g] for g in self.ranking]


class RankingPublic(BaseModel):
    id: int
    item_id: int
    campaign_id: int
    labeler_id: int
    ranking: list[list[int]]
    rationale: str | None
    created_at: UtcDatetime


class SkipPublic(BaseModel):
    item_id: int
    status: Literal["skipped"]


class Progress(BaseModel):
    campaign_id: int
    items_total: int
    items_complete: int = Field(description="items that have `overlap` rankings")
    my_rankings: int
    my_skips: int


class CampaignStats(BaseModel):
    campaign_id: int
    items: int
    items_complete: int
    rankings: int
    skips: int
    active_leases: int
    queue_depth: int = Field(description="rankings still needed: sum over items of overlap - rankings - active leases")
    labelers: int
    max_ranking_id: int = Field(description="largest ranking id in this campaign (0 if none); an export taken now has a watermark >= this")
    rankings_since: int = Field(description="this campaign's rankings with id > since_watermark (equals rankings without the parameter)")


# ---- export --------------------------------------------------------------------------------


class ExportCreate(Strict):
    strategy: Literal["all_pairs", "best_vs_rest"] = "all_pairs"
    aggregation: Literal["none", "majority", "mean_rank"] = Field(
        default="majority", description="none: pairs per ranking; majority / mean_rank: one consensus order per item"
    )
    min_rankings: Annotated[int, Field(ge=1, le=50)] | None = Field(
        default=None, description="rankings an item needs to be exported (default: the campaign's overlap; 1 with aggregation=none)"
    )
    max_disagreement: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = Field(
        default=None, description="drop items whose disagreement (0 unanimous .. 0.5 split) is above this"
    )
    since_watermark: Annotated[int, Field(ge=0, le=2**62)] | None = Field(default=None, description="only feedback after W")
    since_last: bool = Field(default=False, description="continue from the watermark of this campaign's latest export")

    @model_validator(mode="after")
    def _check(self) -> "ExportCreate":
        if self.since_last and self.since_watermark is not None:
            raise ValueError("give at most one of 'since_watermark' and 'since_last'")
        return self


class ExportPublic(BaseModel):
    id: int = Field(description="the export version")
    campaign_id: int
    campaign: str
    params: dict[str, Any]
    since_watermark: int
    watermark: int = Field(description="pass as since_watermark next time to take only newer feedback")
    row_count: int
    dropped_items: list[int] = Field(description="items left out because labelers disagreed beyond max_disagreement")
    created_at: UtcDatetime


class PreferencePair(BaseModel):
    """One export row, the format the reward and DPO stages read."""

    prompt: str
    chosen: str
    rejected: str
    margin: float
    item_id: int
    campaign: str
    labeler_ids: list[int]
    created_at: str
    messages: list[dict[str, Any]] | None = None


# ---- quality -------------------------------------------------------------------------------


class LabelerQuality(BaseModel):
    labeler_id: int
    name: str
    rankings: int
    agreement: float | None = Field(description="share of this labeler's pairwise preferences that match the other labelers' majority")
    agreement_pairs: int
    gold_items: int
    gold_accuracy: float | None = Field(description="share of gold items where this labeler put the gold answer alone on top")


class CampaignQuality(BaseModel):
    campaign_id: int
    alpha: float | None = Field(description="Krippendorff's alpha (ordinal) over ranks; None with too little data")
    items_multi_ranked: int
    rankings: int
    labelers: list[LabelerQuality]


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    schema_revision: str | None


class Me(BaseModel):
    labeler: LabelerPublic
    token_id: int


class ItemsCreate(Strict):
    items: Annotated[list[ItemCreate], Field(min_length=1, max_length=1000)]
