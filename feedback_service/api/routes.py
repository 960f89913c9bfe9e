"""HTTP routes: thin. Each parses input (schemas), calls one ``service`` function, shapes output."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from feedback_service import __version__, service
from feedback_service.db import current_revision
from feedback_service.deps import ACTOR_SECURITY, ActorDep, AdminUser, AuthDep, ClockDep, CurrentUser, ReadSessionDep, SessionDep, SettingsDep
from feedback_service.api.fastroute import HotRoute, fast
from feedback_service.errors import Invalid
from feedback_service.hotpath import PgHotPath, WriterHotPath
from feedback_service.schemas import (
    AssignmentPublic,
    CampaignCreate,
    CampaignPublic,
    CampaignQuality,
    CampaignStats,
    ExportCreate,
    ExportPublic,
    Health,
    ItemAdminPublic,
    ItemCreate,
    ItemPublic,
    ItemsCreate,
    ItemsImported,
    LabelerCreate,
    LeaseBatch,
    LabelerPublic,
    Me,
    Progress,
    PreferencePair,
    RankingCreate,
    RankingPublic,
    SkipPublic,
    TokenCreated,
    TokenPublic,
)

IdPath = Annotated[int, Path(ge=1, le=2**31 - 1)]
ID = TypeAdapter(Annotated[int, Field(ge=1, le=2**31 - 1)])  # IdPath, for fastroute
LEASE_COUNT = TypeAdapter(Annotated[int, Field(ge=1, le=100)])
Offset = Annotated[int, Query(ge=0, le=2**31 - 1)]
Limit = Annotated[int, Query(ge=1, le=1000)]

router = APIRouter(prefix="/api/v1")
hot = APIRouter(prefix="/api/v1", route_class=HotRoute)  # lease, rank, skip: included first, so matched first; see fastroute.py
system = APIRouter()


def _export_public(session, export) -> ExportPublic:  # noqa: ANN001
    campaign = service.get_campaign(session, export.campaign_id)
    return ExportPublic(
        id=export.id,
        campaign_id=export.campaign_id,
        campaign=campaign.name,
        params=export.params,
        since_watermark=export.since_watermark,
        watermark=export.watermark,
        row_count=export.row_count,
        dropped_items=export.params.get("dropped_items", []),
        created_at=export.created_at,
    )


def _item_public(item, user) -> ItemPublic:  # noqa: ANN001
    model = ItemAdminPublic if user.role == "admin" else ItemPublic
    return model.model_validate(item, from_attributes=True)


# ---- system --------------------------------------------------------------------------------


@system.get("/health", response_model=Health, tags=["system"])
def health(request: Request) -> Health:
    """Liveness and schema revision; the only endpoint without a token."""
    return Health(status="ok", version=__version__, schema_revision=current_revision(request.app.state.read_engine))


@system.get("/metrics", response_class=PlainTextResponse, tags=["system"])
def metrics(request: Request, session: ReadSessionDep, clock: ClockDep, _: AdminUser) -> Response:
    """Prometheus text format (admin token; point the scraper's bearer token at it)."""
    request.app.state.metrics.queue.set(service.total_queue_depth(session, clock()))
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---- labelers and tokens -------------------------------------------------------------------


@router.get("/me", response_model=Me, tags=["labelers"])
def me(auth: AuthDep) -> Me:
    labeler, token = auth
    return Me(labeler=LabelerPublic.model_validate(labeler, from_attributes=True), token_id=token.id)


@router.post("/labelers", response_model=TokenCreated, status_code=status.HTTP_201_CREATED, tags=["labelers"])
def create_labeler(body: LabelerCreate, session: SessionDep, clock: ClockDep, _: AdminUser) -> TokenCreated:
    """Create a labeler (or admin) and return its first token. The token is shown only here."""
    labeler, token, row = service.create_labeler(session, body, clock())
    return TokenCreated(token=token, token_id=row.id, labeler=LabelerPublic.model_validate(labeler, from_attributes=True))


@router.get("/labelers", response_model=list[LabelerPublic], tags=["labelers"])
def list_labelers(session: ReadSessionDep, _: AdminUser) -> list[LabelerPublic]:
    return [LabelerPublic.model_validate(x, from_attributes=True) for x in service.list_labelers(session)]


@router.post("/labelers/{labeler_id}/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED, tags=["labelers"])
def issue_token(labeler_id: IdPath, session: SessionDep, clock: ClockDep, _: AdminUser) -> TokenCreated:
    labeler = service.get_labeler(session, labeler_id)
    token, row = service.issue_token(session, labeler, clock())
    return TokenCreated(token=token, token_id=row.id, labeler=LabelerPublic.model_validate(labeler, from_attributes=True))


@router.get("/labelers/{labeler_id}/tokens", response_model=list[TokenPublic], tags=["labelers"])
def list_tokens(labeler_id: IdPath, session: ReadSessionDep, _: AdminUser) -> list[TokenPublic]:
    return [TokenPublic.model_validate(t, from_attributes=True) for t in service.list_tokens(session, labeler_id)]


@router.post("/labelers/{labeler_id}/deactivate", response_model=LabelerPublic, tags=["labelers"])
def deactivate_labeler(labeler_id: IdPath, session: SessionDep, clock: ClockDep, request: Request, _: AdminUser) -> LabelerPublic:
    """Deactivate a labeler and revoke all its tokens; its rankings stay."""
    request.app.state.actor_cache.clear()  # the hot routes re-check tokens anyway; this frees memory
    return LabelerPublic.model_validate(service.deactivate_labeler(session, labeler_id, clock()), from_attributes=True)


@router.delete("/tokens/{token_id}", response_model=TokenPublic, tags=["labelers"])
def revoke_token(token_id: IdPath, session: SessionDep, clock: ClockDep, request: Request, user: CurrentUser) -> TokenPublic:
    """Revoke a token (admins: any; labelers: their own). Refused from the next request on."""
    request.app.state.actor_cache.clear()  # the hot routes re-check tokens anyway; this frees memory
    return TokenPublic.model_validate(service.revoke_token(session, token_id, user, clock()), from_attributes=True)


# ---- campaigns and items -------------------------------------------------------------------


@router.post("/campaigns", response_model=CampaignPublic, status_code=status.HTTP_201_CREATED, tags=["campaigns"])
def create_campaign(body: CampaignCreate, session: SessionDep, clock: ClockDep, settings: SettingsDep, _: AdminUser) -> CampaignPublic:
    campaign = service.create_campaign(session, body, clock(), settings.default_lease_seconds)
    return CampaignPublic.model_validate(campaign, from_attributes=True)


@router.get("/campaigns", response_model=list[CampaignPublic], tags=["campaigns"])
def list_campaigns(session: ReadSessionDep, _: CurrentUser) -> list[CampaignPublic]:
    return [CampaignPublic.model_validate(c, from_attributes=True) for c in service.list_campaigns(session)]


@router.get("/campaigns/{campaign_id}", response_model=CampaignPublic, tags=["campaigns"])
def get_campaign(campaign_id: IdPath, session: ReadSessionDep, _: CurrentUser) -> CampaignPublic:
    return CampaignPublic.model_validate(service.get_campaign(session, campaign_id), from_attributes=True)


@router.post("/campaigns/{campaign_id}/items", response_model=ItemsImported, tags=["items"])
def add_items(campaign_id: IdPath, body: ItemsCreate, session: SessionDep, clock: ClockDep, _: AdminUser) -> ItemsImported:
    """Add items as JSON; items already present (same content hash) are not added twice."""
    return service.import_items(session, service.get_campaign(session, campaign_id), body.items, clock())


NDJSON_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/x-ndjson": {"schema": {"type": "string", "description": "one ItemCreate JSON object per line"}}},
    }
}


async def ndjson_items(request: Request) -> list[ItemCreate]:
    """Parse an NDJSON body, one ItemCreate per line; every bad line is reported, by number."""
    items, errors = [], []
    for n, line in enumerate((await request.body()).split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append(ItemCreate.model_validate_json(line))
        except ValidationError as e:
            for err in e.errors(include_url=False, include_context=False, include_input=False):
                errors.append({"loc": ["body", f"line {n}", *err["loc"]], "msg": err["msg"], "type": err["type"]})
        if len(errors) >= 100:
            break
    if errors:
        raise Invalid.many(errors)
    if not items:
        raise Invalid(["body"], "no items: send one JSON object per line (application/x-ndjson)")
    return items


@router.post("/campaigns/{campaign_id}/items/bulk", response_model=ItemsImported, tags=["items"], openapi_extra=NDJSON_BODY)
def add_items_bulk(
    campaign_id: IdPath,
    items: Annotated[list[ItemCreate], Depends(ndjson_items)],
    session: SessionDep,
    clock: ClockDep,
    _: AdminUser,
) -> ItemsImported:
    """Bulk import: NDJSON, one ItemCreate per line; all lines are checked before any is stored."""
    return service.import_items(session, service.get_campaign(session, campaign_id), items, clock())


@router.get("/campaigns/{campaign_id}/items", response_model=list[ItemAdminPublic], tags=["items"])
def list_items(campaign_id: IdPath, session: ReadSessionDep, _: AdminUser, offset: Offset = 0, limit: Limit = 100) -> list[ItemAdminPublic]:
    campaign = service.get_campaign(session, campaign_id)
    return [ItemAdminPublic.model_validate(i, from_attributes=True) for i in service.list_items(session, campaign, offset, limit)]


@router.get("/items/{item_id}", response_model=ItemAdminPublic | ItemPublic, tags=["items"])
def get_item(item_id: IdPath, session: ReadSessionDep, user: CurrentUser) -> ItemPublic:
    """Admins see any item (with gold and metadata); labelers only items assigned to them."""
    return _item_public(service.get_item_for(session, item_id, user), user)


# ---- assignment and rankings ---------------------------------------------------------------


# The hot routes are async and hand their work to ``app.state.hot`` (hotpath.py: group commit of
# service.py's units on SQLite, of server-side function calls on PostgreSQL): no worker thread is
# held while a commit runs. Their answer is serialized here, from the public model the hot path built, and is sent
# only after the commit returned (durable before the 2xx).


def _hot(request: Request) -> WriterHotPath | PgHotPath:
    return request.app.state.hot


def _json(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


@hot.post(
    "/items/{item_id}/rankings",
    response_model=RankingPublic,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": RankingPublic, "description": "the same ranking was already stored (idempotent replay)"}},
    tags=["labeling"],
    openapi_extra=ACTOR_SECURITY,
)
@fast(path={"item_id": ID}, body=RankingCreate)
async def submit_ranking(item_id: IdPath, body: RankingCreate, actor: ActorDep, request: Request) -> Response:
    """Store a full order of the item's answers (nested lists are ties). Durable before the 2xx."""
    now = request.app.state.clock()
    ranking, created = await _hot(request).submit_ranking(item_id, actor, body, now)
    if created:
        request.state.ranking_stored = True
    return _json(ranking, status.HTTP_201_CREATED if created else status.HTTP_200_OK)


@hot.post(
    "/campaigns/{campaign_id}/next",
    response_model=AssignmentPublic,
    responses={204: {"description": "nothing left for this labeler"}},
    tags=["labeling"],
    openapi_extra=ACTOR_SECURITY,
)
@fast(path={"campaign_id": ID})
async def next_item(campaign_id: IdPath, actor: ActorDep, request: Request) -> Response:
    """Lease the next item to rank (or return the lease already held). 204 when none is left."""
    now = request.app.state.clock()
    out = await _hot(request).next_assignment(campaign_id, actor, now)
    return Response(status_code=status.HTTP_204_NO_CONTENT) if out is None else _json(out)


@hot.post("/campaigns/{campaign_id}/leases", response_model=LeaseBatch, tags=["labeling"], openapi_extra=ACTOR_SECURITY)
@fast(path={"campaign_id": ID}, query={"count": (LEASE_COUNT, 10)})
async def lease_items(
    campaign_id: IdPath,
    actor: ActorDep,
    request: Request,
    count: Annotated[int, Query(ge=1, le=100, description="how many leases to hold after the call")] = 10,
) -> Response:
    """Hold up to ``count`` leases at once, oldest first (those already held count): for clients
    that keep a few items at hand, so a ranking costs one request instead of two. Overlap and
    lease expiry apply to each lease as with ``next``; an empty list when nothing is left."""
    now = request.app.state.clock()
    leases = await _hot(request).lease_items(campaign_id, actor, now, count)
    return _json(LeaseBatch.model_construct(leases=leases))


@hot.post("/items/{item_id}/skip", response_model=SkipPublic, tags=["labeling"], openapi_extra=ACTOR_SECURITY)
@fast(path={"item_id": ID})
async def skip(item_id: IdPath, actor: ActorDep, request: Request) -> Response:
    """Give the item back; it is not offered to you again."""
    now = request.app.state.clock()
    await _hot(request).skip_item(item_id, actor, now)
    return _json(SkipPublic(item_id=item_id, status="skipped"))


@router.get("/rankings", response_model=list[RankingPublic], tags=["labeling"])
def list_rankings(
    session: ReadSessionDep,
    user: CurrentUser,
    campaign_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    labeler_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    offset: Offset = 0,
    limit: Limit = 100,
) -> list[RankingPublic]:
    """Admins: all rankings; labelers: their own only."""
    rows = service.list_rankings(session, user, campaign_id, labeler_id, offset, limit)
    return [RankingPublic.model_validate(r, from_attributes=True) for r in rows]


@router.get("/rankings/{ranking_id}", response_model=RankingPublic, tags=["labeling"])
def get_ranking(ranking_id: IdPath, session: ReadSessionDep, user: CurrentUser) -> RankingPublic:
    return RankingPublic.model_validate(service.get_ranking_for(session, ranking_id, user), from_attributes=True)


@router.get("/campaigns/{campaign_id}/progress", response_model=Progress, tags=["labeling"])
def progress(campaign_id: IdPath, session: ReadSessionDep, user: CurrentUser) -> Progress:
    return service.progress(session, service.get_campaign(session, campaign_id), user)


# ---- stats, quality, export ----------------------------------------------------------------


@router.get("/campaigns/{campaign_id}/stats", response_model=CampaignStats, tags=["quality"])
def stats(
    campaign_id: IdPath,
    session: ReadSessionDep,
    clock: ClockDep,
    _: AdminUser,
    since_watermark: Annotated[int | None, Query(ge=0, le=2**62, description="count rankings with id > this watermark in rankings_since")] = None,
) -> CampaignStats:
    """Counts for the campaign; ``rankings_since`` counts rankings newer than ``since_watermark``
    (e.g. an export's watermark: how much new feedback an incremental export would see)."""
    return service.stats(session, service.get_campaign(session, campaign_id), clock(), since_watermark)


@router.get("/campaigns/{campaign_id}/quality", response_model=CampaignQuality, tags=["quality"])
def quality(campaign_id: IdPath, session: ReadSessionDep, _: AdminUser) -> CampaignQuality:
    """Krippendorff's alpha for the campaign; agreement with the majority and gold accuracy per labeler."""
    return service.campaign_quality(session, service.get_campaign(session, campaign_id))


@router.post("/campaigns/{campaign_id}/exports", response_model=ExportPublic, status_code=status.HTTP_201_CREATED, tags=["export"])
def create_export(campaign_id: IdPath, body: ExportCreate, session: SessionDep, clock: ClockDep, request: Request, _: AdminUser) -> ExportPublic:
    """Snapshot preference pairs as a new, immutable export version; says its new watermark."""
    export = service.create_export(session, service.get_campaign(session, campaign_id), body, clock())
    request.state.export_created = True
    return _export_public(session, export)


@router.get("/exports", response_model=list[ExportPublic], tags=["export"])
def list_exports(session: ReadSessionDep, _: AdminUser, campaign_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None) -> list[ExportPublic]:
    return [_export_public(session, e) for e in service.list_exports(session, campaign_id)]


@router.get("/exports/{export_id}", response_model=ExportPublic, tags=["export"])
def get_export(export_id: IdPath, session: ReadSessionDep, _: AdminUser) -> ExportPublic:
    return _export_public(session, service.get_export(session, export_id))


@router.get(
    "/exports/{export_id}/rows",
    tags=["export"],
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}, "description": "PreferencePair JSON lines"}},
)
def export_rows(export_id: IdPath, session: ReadSessionDep, _: AdminUser) -> StreamingResponse:
    """The export's rows as JSONL (one PreferencePair per line), always the same bytes for a version."""
    export = service.get_export(session, export_id)

    def lines():  # noqa: ANN202  streamed page by page; the read session stays open until the end
        for offset in range(0, export.row_count, 1000):
            rows = service.export_rows(session, export_id, offset, 1000)
            yield "".join(json.dumps(PreferencePair.model_validate(r).model_dump(exclude_none=True), ensure_ascii=False) + "\n" for r in rows)

    return StreamingResponse(lines(), media_type="application/x-ndjson")
