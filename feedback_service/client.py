"""Python client for the feedback service (httpx). Light: no torch, no FastAPI, no SQLAlchemy.

    from feedback_service.client import FeedbackClient
    fc = FeedbackClient("http://127.0.0.1:8000", token)
    c = fc.create_campaign("helpfulness-v1", guidelines="Prefer correct, concise answers.", overlap=3)
    fc.add_items(c["id"], [{"prompt": "2+2?", "answers": [{"text": "4", "model_id": "sft-1"}, {"text": "5", "model_id": "sft-1"}]}])
    ex = fc.export(c["id"], aggregation="majority", since_last=True, jsonl_path="pairs.jsonl", dataset_dir="pairs_ds")
    ex.watermark, ex.version, ex.rows[0]["chosen"]
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import httpx


class FeedbackError(Exception):
    """A non-2xx answer from the service: ``status`` and the service's ``detail``."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Labeler(TypedDict):
    id: int
    name: str
    role: Literal["admin", "labeler"]
    active: bool
    created_at: str


class TokenCreated(TypedDict):
    token: str
    token_id: int
    labeler: Labeler


class Campaign(TypedDict):
    id: int
    name: str
    guidelines: str
    overlap: int
    lease_seconds: int
    created_at: str


class Answer(TypedDict):
    id: int
    text: str
    model_id: str
    model_version: str | None
    sampling: dict[str, Any] | None


class Item(TypedDict):
    id: int
    campaign_id: int
    prompt: str
    messages: list[dict[str, Any]] | None
    answers: list[Answer]
    created_at: str


class Assignment(TypedDict):
    assignment_id: int
    campaign_id: int
    lease_expires_at: str
    item: Item


class Ranking(TypedDict):
    id: int
    item_id: int
    campaign_id: int
    labeler_id: int
    ranking: list[list[int]]
    rationale: str | None
    created_at: str


class ItemsImported(TypedDict):
    created: int
    duplicates: int
    item_ids: list[int]


class PreferencePair(TypedDict, total=False):
    prompt: str
    chosen: str
    rejected: str
    margin: float
    item_id: int
    campaign: str
    labeler_ids: list[int]
    created_at: str
    messages: list[dict[str, Any]]


@dataclass(frozen=True)
class Export:
    """One export version: its metadata (``info``) and its rows."""

    info: dict[str, Any]
    rows: list[PreferencePair] = field(repr=False)

    @property
    def version(self) -> int:
        return int(self.info["id"])

    @property
    def watermark(self) -> int:
        return int(self.info["watermark"])


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


EXPORT_COLUMNS = ("prompt", "chosen", "rejected", "margin", "item_id", "campaign", "labeler_ids", "created_at")


def write_dataset(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Save rows as a ``datasets`` directory (``Dataset.save_to_disk``); ``messages`` column only
    when some row is a chat-history item (None for the others)."""
    import datasets  # noqa: PLC0415  (lazy: heavy, and only needed here)

    columns = {c: [r[c] for r in rows] for c in EXPORT_COLUMNS}
    if any("messages" in r for r in rows):
        columns["messages"] = [r.get("messages") for r in rows]
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "margin": datasets.Value("float64"),
            "item_id": datasets.Value("int64"),
            "campaign": datasets.Value("string"),
            "labeler_ids": datasets.List(datasets.Value("int64")),
            "created_at": datasets.Value("string"),
            **({"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})} if "messages" in columns else {}),
        }
    )
    # num_shards=1: an empty export saved with 0 shards could not be loaded back (datasets 5.2)
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path), num_shards=1)
    return Path(path)


class FeedbackClient:
    """Typed client for the feedback service's HTTP API (``/api/v1``).

    Idempotent calls (GETs, ``submit_ranking``) are retried ``retries`` times on connection
    errors: re-posting a ranking after a lost answer cannot store it twice.
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0, retries: int = 2, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "FeedbackClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --

    def _call(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> httpx.Response:
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                response = self._http.request(method, path, **kwargs)
                break
            except httpx.TransportError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise FeedbackError(response.status_code, detail)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._call(method, path, **kwargs).json()

    # -- system and identity --

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health", idempotent=True)

    def me(self) -> dict[str, Any]:
        return self._json("GET", "/api/v1/me", idempotent=True)

    def metrics(self) -> str:
        return self._call("GET", "/metrics", idempotent=True).text

    # -- labelers and tokens (admin) --

    def create_labeler(self, name: str, role: Literal["admin", "labeler"] = "labeler") -> TokenCreated:
        """Create a labeler; the returned ``token`` is shown only this once."""
        return self._json("POST", "/api/v1/labelers", json={"name": name, "role": role})

    def list_labelers(self) -> list[Labeler]:
        return self._json("GET", "/api/v1/labelers", idempotent=True)

    def issue_token(self, labeler_id: int) -> TokenCreated:
        return self._json("POST", f"/api/v1/labelers/{labeler_id}/tokens")

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        return self._json("DELETE", f"/api/v1/tokens/{token_id}", idempotent=True)

    def deactivate_labeler(self, labeler_id: int) -> Labeler:
        return self._json("POST", f"/api/v1/labelers/{labeler_id}/deactivate", idempotent=True)

    # -- campaigns and items --

    def create_campaign(self, name: str, guidelines: str = "", overlap: int = 1, lease_seconds: int | None = None) -> Campaign:
        body: dict[str, Any] = {"name": name, "guidelines": guidelines, "overlap": overlap}
        if lease_seconds is not None:
            body["lease_seconds"] = lease_seconds
        return self._json("POST", "/api/v1/campaigns", json=body)

    def list_campaigns(self) -> list[Campaign]:
        return self._json("GET", "/api/v1/campaigns", idempotent=True)

    def get_campaign(self, campaign_id: int) -> Campaign:
        return self._json("GET", f"/api/v1/campaigns/{campaign_id}", idempotent=True)

    def add_items(self, campaign_id: int, items: Iterable[Mapping[str, Any]], chunk_size: int = 2000) -> ItemsImported:
        """Bulk import as NDJSON (chunked). Items already present (same content hash) are not added
        twice, so re-running an import is safe. Item: {prompt | messages, answers: [{text, model_id,
        model_version?, sampling?}], gold_best?, meta?}."""
        total: ItemsImported = {"created": 0, "duplicates": 0, "item_ids": []}
        chunk: list[str] = []

        def flush() -> None:
            if chunk:
                out = self._json(
                    "POST", f"/api/v1/campaigns/{campaign_id}/items/bulk", content="\n".join(chunk).encode(), headers={"Content-Type": "application/x-ndjson"}, idempotent=True
                )
                total["created"] += out["created"]
                total["duplicates"] += out["duplicates"]
                total["item_ids"] += out["item_ids"]
                chunk.clear()

        for item in items:
            chunk.append(json.dumps(item, ensure_ascii=False))
            if len(chunk) >= chunk_size:
                flush()
        flush()
        return total

    def list_items(self, campaign_id: int, offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Admin view of a campaign's items (with ``gold_answer_id`` for gold items), one page."""
        return self._json("GET", f"/api/v1/campaigns/{campaign_id}/items", params={"offset": offset, "limit": limit}, idempotent=True)

    def iter_items(self, campaign_id: int, page: int = 100) -> Iterable[dict[str, Any]]:
        """Every item of a campaign (admin), page by page."""
        offset = 0
        while True:
            batch = self.list_items(campaign_id, offset=offset, limit=page)
            yield from batch
            if len(batch) < page:
                return
            offset += len(batch)

    def get_item(self, item_id: int) -> Item:
        return self._json("GET", f"/api/v1/items/{item_id}", idempotent=True)

    # -- labeling --

    def next_item(self, campaign_id: int) -> Assignment | None:
        """Lease the next item to rank; None when nothing is left for this labeler."""
        response = self._call("POST", f"/api/v1/campaigns/{campaign_id}/next")
        return None if response.status_code == 204 else response.json()

    def lease_items(self, campaign_id: int, count: int = 10) -> list[Assignment]:
        """Hold up to ``count`` leases at once (those already held count), oldest first; an
        empty list when nothing is left. Rank them one by one with ``submit_ranking``."""
        return self._json("POST", f"/api/v1/campaigns/{campaign_id}/leases", params={"count": count})["leases"]

    def submit_ranking(self, item_id: int, ranking: Sequence[int | Sequence[int]], rationale: str | None = None) -> Ranking:
        """ranking: answer ids best first; a nested list is a tie group. Safe to retry."""
        body: dict[str, Any] = {"ranking": [list(g) if not isinstance(g, int) else g for g in ranking]}
        if rationale is not None:
            body["rationale"] = rationale
        return self._json("POST", f"/api/v1/items/{item_id}/rankings", json=body, idempotent=True)

    def skip(self, item_id: int) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/items/{item_id}/skip", idempotent=True)

    def progress(self, campaign_id: int) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/campaigns/{campaign_id}/progress", idempotent=True)

    def list_rankings(self, campaign_id: int | None = None, labeler_id: int | None = None, offset: int = 0, limit: int = 1000) -> list[Ranking]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if campaign_id is not None:
            params["campaign_id"] = campaign_id
        if labeler_id is not None:
            params["labeler_id"] = labeler_id
        return self._json("GET", "/api/v1/rankings", params=params, idempotent=True)

    # -- stats, quality, export (admin) --

    def stats(self, campaign_id: int, since_watermark: int | None = None) -> dict[str, Any]:
        """Campaign counts; ``rankings_since`` counts rankings with id > ``since_watermark``
        (all of them when omitted), ``max_ranking_id`` is the campaign's largest ranking id."""
        params = {"since_watermark": since_watermark} if since_watermark is not None else {}
        return self._json("GET", f"/api/v1/campaigns/{campaign_id}/stats", params=params, idempotent=True)

    def quality(self, campaign_id: int) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/campaigns/{campaign_id}/quality", idempotent=True)

    def export(
        self,
        campaign_id: int,
        *,
        strategy: Literal["all_pairs", "best_vs_rest"] = "all_pairs",
        aggregation: Literal["none", "majority", "mean_rank"] = "majority",
        min_rankings: int | None = None,
        max_disagreement: float | None = None,
        since_watermark: int | None = None,
        since_last: bool = False,
        jsonl_path: str | Path | None = None,
        dataset_dir: str | Path | None = None,
    ) -> Export:
        """Create a new export version and fetch its rows; optionally write them as JSONL and/or
        as a ``datasets`` directory. ``since_last=True`` takes only feedback newer than the
        campaign's latest export (the retraining loop's incremental step)."""
        body: dict[str, Any] = {"strategy": strategy, "aggregation": aggregation, "since_last": since_last}
        for key, value in (("min_rankings", min_rankings), ("max_disagreement", max_disagreement), ("since_watermark", since_watermark)):
            if value is not None:
                body[key] = value
        info = self._json("POST", f"/api/v1/campaigns/{campaign_id}/exports", json=body)
        return self.get_export(info["id"], jsonl_path=jsonl_path, dataset_dir=dataset_dir)

    def get_export(self, export_id: int, *, jsonl_path: str | Path | None = None, dataset_dir: str | Path | None = None) -> Export:
        """An existing export version (immutable: the same rows every time)."""
        info = self._json("GET", f"/api/v1/exports/{export_id}", idempotent=True)
        text = self._call("GET", f"/api/v1/exports/{export_id}/rows", idempotent=True).text
        rows: list[PreferencePair] = [json.loads(line) for line in text.splitlines() if line]
        if jsonl_path is not None:
            write_jsonl(rows, jsonl_path)
        if dataset_dir is not None:
            write_dataset(rows, dataset_dir)
        return Export(info=info, rows=rows)

    def list_exports(self, campaign_id: int | None = None) -> list[dict[str, Any]]:
        params = {"campaign_id": campaign_id} if campaign_id is not None else {}
        return self._json("GET", "/api/v1/exports", params=params, idempotent=True)
