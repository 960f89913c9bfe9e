"""What the routes do, as plain functions over a Session: no FastAPI in here.

Every function runs inside the caller's transaction (one per request, see ``deps.get_session``).
Concurrency: on SQLite each transaction holds the write lock from its start (BEGIN IMMEDIATE);
on PostgreSQL the item row is locked (FOR UPDATE) before any check-then-insert on that item.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import BigInteger, Connection, DateTime, Integer, String, Text, and_, bindparam, false, func, insert, literal, or_, select, text, update
from sqlalchemy.orm import Session

from feedback_service import pairs, quality
from feedback_service.fastsql import Prepared
from feedback_service.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from feedback_service.models import Answer, ApiToken, Assignment, Campaign, Export, ExportRow, Item, Labeler, Ranking
from feedback_service.schemas import (
    AnswerPublic,
    AssignmentPublic,
    CampaignCreate,
    CampaignQuality,
    CampaignStats,
    ExportCreate,
    ItemCreate,
    ItemPublic,
    ItemsImported,
    LabelerCreate,
    LabelerQuality,
    Progress,
    RankingCreate,
    RankingPublic,
)
from feedback_service.security import display_prefix, hash_token, new_token


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# ---- labelers and tokens -------------------------------------------------------------------


def authenticate(session: Session, token: str) -> tuple[Labeler, ApiToken] | None:
    row = session.execute(
        select(ApiToken, Labeler)
        .join(Labeler, Labeler.id == ApiToken.labeler_id)
        .where(ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None), Labeler.active.is_(True))
    ).first()
    return (row[1], row[0]) if row else None


def issue_token(session: Session, labeler: Labeler, now: datetime, token: str | None = None) -> tuple[str, ApiToken]:
    token = token or new_token()
    row = ApiToken(labeler_id=labeler.id, token_hash=hash_token(token), prefix=display_prefix(token), created_at=now)
    session.add(row)
    session.flush()
    return token, row


def create_labeler(session: Session, data: LabelerCreate, now: datetime) -> tuple[Labeler, str, ApiToken]:
    if session.scalar(select(Labeler.id).where(Labeler.name == data.name)) is not None:
        raise Conflict(f"a labeler named {data.name!r} already exists")
    labeler = Labeler(name=data.name, role=data.role, active=True, created_at=now)
    session.add(labeler)
    session.flush()
    token, row = issue_token(session, labeler, now)
    return labeler, token, row


def bootstrap_admin(session: Session, name: str, now: datetime, token: str | None = None) -> str | None:
    """Make sure an admin called ``name`` exists; with ``token``, make that token valid for it.

    Returns a newly issued token (to print once), or None when ``token`` was given or already known.
    """
    labeler = session.scalar(select(Labeler).where(Labeler.name == name))
    if labeler is None:
        labeler = Labeler(name=name, role="admin", active=True, created_at=now)
        session.add(labeler)
        session.flush()
    elif labeler.role != "admin":
        raise Conflict(f"{name!r} exists and is not an admin")
    if token is not None:
        if session.scalar(select(ApiToken.id).where(ApiToken.token_hash == hash_token(token))) is None:
            issue_token(session, labeler, now, token)
        return None
    return issue_token(session, labeler, now)[0]


def has_admin(session: Session) -> bool:
    return session.scalar(select(Labeler.id).where(Labeler.role == "admin", Labeler.active.is_(True)).limit(1)) is not None


def get_labeler(session: Session, labeler_id: int) -> Labeler:
    labeler = session.get(Labeler, labeler_id)
    if labeler is None:
        raise NotFound(f"labeler {labeler_id} not found")
    return labeler


def list_labelers(session: Session) -> Sequence[Labeler]:
    return session.scalars(select(Labeler).order_by(Labeler.id)).all()


def list_tokens(session: Session, labeler_id: int) -> Sequence[ApiToken]:
    get_labeler(session, labeler_id)
    return session.scalars(select(ApiToken).where(ApiToken.labeler_id == labeler_id).order_by(ApiToken.id)).all()


def revoke_token(session: Session, token_id: int, actor: Labeler, now: datetime) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None or (actor.role != "admin" and row.labeler_id != actor.id):
        raise NotFound(f"token {token_id} not found")
    if row.revoked_at is None:
        row.revoked_at = now
    return row


def deactivate_labeler(session: Session, labeler_id: int, now: datetime) -> Labeler:
    labeler = get_labeler(session, labeler_id)
    labeler.active = False
    for row in session.scalars(select(ApiToken).where(ApiToken.labeler_id == labeler_id, ApiToken.revoked_at.is_(None))):
        row.revoked_at = now
    return labeler


# ---- campaigns and items -------------------------------------------------------------------


def create_campaign(session: Session, data: CampaignCreate, now: datetime, default_lease_seconds: int) -> Campaign:
    if session.scalar(select(Campaign.id).where(Campaign.name == data.name)) is not None:
        raise Conflict(f"a campaign named {data.name!r} already exists")
    campaign = Campaign(
        name=data.name,
        guidelines=data.guidelines,
        overlap=data.overlap,
        lease_seconds=data.lease_seconds or default_lease_seconds,
        created_at=now,
    )
    session.add(campaign)
    session.flush()
    return campaign


def get_campaign(session: Session, campaign_id: int) -> Campaign:
    campaign = session.get(Campaign, campaign_id)
    if campaign is None:
        raise NotFound(f"campaign {campaign_id} not found")
    return campaign


def list_campaigns(session: Session) -> Sequence[Campaign]:
    return session.scalars(select(Campaign).order_by(Campaign.id)).all()


def content_hash(data: ItemCreate) -> str:
    """SHA-256 over what the labeler sees and the answers' provenance (not gold or metadata)."""
    body = {
        "prompt": data.prompt,
        "messages": [m.model_dump() for m in data.messages] if data.messages else None,
        "answers": [a.model_dump() for a in data.answers],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def import_items(session: Session, campaign: Campaign, items: Sequence[ItemCreate], now: datetime) -> ItemsImported:
    hashes = [content_hash(d) for d in items]
    known: dict[str, int] = {}
    for chunk in range(0, len(hashes), 500):
        rows = session.execute(
            select(Item.content_hash, Item.id).where(Item.campaign_id == campaign.id, Item.content_hash.in_(hashes[chunk : chunk + 500]))
        )
        known.update({h: i for h, i in rows})
    ids, created = [], 0
    for data, h in zip(items, hashes):
        if h in known:
            ids.append(known[h])
            continue
        prompt = data.prompt if data.prompt is not None else data.messages[-1].content  # type: ignore[index]
        item = Item(
            campaign_id=campaign.id,
            content_hash=h,
            prompt=prompt,
            messages=[m.model_dump() for m in data.messages] if data.messages else None,
            meta=data.meta,
            created_at=now,
        )
        session.add(item)
        session.flush()
        answers = [
            Answer(item_id=item.id, position=k, text=a.text, model_id=a.model_id, model_version=a.model_version, sampling=a.sampling)
            for k, a in enumerate(data.answers)
        ]
        session.add_all(answers)
        session.flush()
        if data.gold_best is not None:
            item.gold_answer_id = answers[data.gold_best].id
        known[h] = item.id
        ids.append(item.id)
        created += 1
    if created >= 100 and _is_pg(session):
        # Fresh statistics for the lease query: without them PostgreSQL plans it as a scan and sort
        # of the whole campaign (tens of ms per lease) until autovacuum's next ANALYZE. SQLite
        # picks the index without statistics.
        session.execute(text("ANALYZE items"))
    return ItemsImported(created=created, duplicates=len(items) - created, item_ids=ids)


def list_items(session: Session, campaign: Campaign, offset: int, limit: int) -> Sequence[Item]:
    return session.scalars(select(Item).where(Item.campaign_id == campaign.id).order_by(Item.id).offset(offset).limit(limit)).all()


def get_item_for(session: Session, item_id: int, actor: Labeler) -> Item:
    """The item, if ``actor`` may see it: admins see all, labelers only items assigned to them."""
    item = session.scalar(select(Item).where(Item.id == item_id))
    if item is None:
        raise NotFound(f"item {item_id} not found")
    mine = select(Assignment.id).where(Assignment.item_id == item.id, Assignment.labeler_id == actor.id)
    if actor.role != "admin" and session.scalar(mine) is None:
        raise NotFound(f"item {item_id} not found")  # 404, not 403: do not reveal other labelers' items
    return item


# ---- assignment and rankings: the hot paths ------------------------------------------------
#
# Lease, rank and skip run for every labeler action. They are written as a few indexed SQLAlchemy
# Core statements, built once at import and run through ``fastsql.Prepared`` (compiled once per
# dialect, executed on the transaction's DBAPI cursor), with no ORM identity map, unit of work or
# lazy loads. They run inside ``Writer`` units (one transaction, or one savepoint of a group
# commit) and re-check the caller's token there first, so a token revoked by any process is
# refused in the very transaction that would have written (see ``deps.get_actor``).


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is calling: enough to authorize a hot-path request without loading ORM rows."""

    id: int
    role: str
    token_id: int


_tokens, _labelers, _campaigns = ApiToken.__table__, Labeler.__table__, Campaign.__table__
_items, _answers, _assign, _rank = Item.__table__, Answer.__table__, Assignment.__table__, Ranking.__table__
_now = bindparam("now", type_=DateTime())
_lab, _iid, _cid = (bindparam(name, type_=BigInteger()) for name in ("lab", "iid", "cid"))
_overlap = bindparam("overlap", type_=Integer())

_ACTOR_BY_HASH = Prepared(
    select(_labelers.c.id, _labelers.c.role, _tokens.c.id)
    .join(_labelers, _labelers.c.id == _tokens.c.labeler_id)
    .where(_tokens.c.token_hash == bindparam("h"), _tokens.c.revoked_at.is_(None), _labelers.c.active.is_(True))
)
_TOKEN_LIVE = Prepared(
    select(_tokens.c.id)
    .join(_labelers, _labelers.c.id == _tokens.c.labeler_id)
    .where(_tokens.c.id == bindparam("tid"), _tokens.c.revoked_at.is_(None), _labelers.c.active.is_(True))
)


def _slots_taken_of(item_id, exclude_labeler=None):  # noqa: ANN001, ANN202
    """Assignments of the item that count against overlap: done, or leased and not yet expired."""
    a = _assign.alias("slot")
    q = select(func.count()).select_from(a).where(a.c.item_id == item_id, or_(a.c.status == "done", and_(a.c.status == "leased", a.c.expires_at > _now)))
    if exclude_labeler is not None:
        q = q.where(a.c.labeler_id != exclude_labeler)
    return q.scalar_subquery()





def _token_live():  # noqa: ANN202
    """1 when the caller's token (bind ``tid``) is live (not revoked, labeler active), else 0."""
    return (
        select(func.count())
        .select_from(_tokens.join(_labelers, _labelers.c.id == _tokens.c.labeler_id))
        .where(_tokens.c.id == bindparam("tid", type_=BigInteger()), _tokens.c.revoked_at.is_(None), _labelers.c.active.is_(True))
        .scalar_subquery()
    )


# One round trip before leasing: is the token still live, the campaign's settings, and the lease
# this labeler already holds in it (the oldest unexpired one), if any. No row: no such campaign.
_current = _assign.alias("cur")
_NEXT_CONTEXT = Prepared(
    select(_token_live(), _campaigns.c.overlap, _campaigns.c.lease_seconds, _current.c.id, _current.c.item_id, _current.c.expires_at)
    .select_from(
        _campaigns.outerjoin(
            _current,
            and_(_current.c.labeler_id == _lab, _current.c.campaign_id == _campaigns.c.id, _current.c.status == "leased", _current.c.expires_at > _now),
        )
    )
    .where(_campaigns.c.id == _cid)
    .order_by(_current.c.id)
    .limit(1)
)


_HELD = Prepared(
    select(_assign.c.id, _assign.c.item_id, _assign.c.expires_at)
    .where(_assign.c.labeler_id == _lab, _assign.c.campaign_id == _cid, _assign.c.status == "leased", _assign.c.expires_at > _now)
    .order_by(_assign.c.id)
    .limit(bindparam("n", type_=Integer()))
)


def _pick(exclude_tried: bool, skip_locked: bool):  # noqa: ANN202
    """The open item of the campaign with the lowest id that this labeler has not ranked, skipped
    or currently leased and that has a free slot, with this labeler's (expired) lease on it, if
    any. PostgreSQL locks the item row (skipping rows other requests are locking right now, so no
    thundering herd on the lowest id); SQLite ignores FOR UPDATE, its transaction holds the write
    lock. ``exclude_tried``: also not the ids in the expanding ``tried`` (a rare retry).

    Both filters are correlated scalar subqueries on purpose: the planner cannot turn them into a
    join over all of the labeler's assignments, so it walks the open items in id order and probes
    two indexes per item until the first fits (the LIMIT 1 stops it early)."""
    mine = _assign.alias("mine")
    blocked_for_me = (
        select(func.count())
        .select_from(mine)
        .where(mine.c.item_id == _items.c.id, mine.c.labeler_id == _lab, or_(mine.c.status != "leased", mine.c.expires_at > _now))
        .scalar_subquery()
    )  # an expired lease of mine does not block: the item may come back to me
    my_lease = select(mine.c.id).where(mine.c.item_id == _items.c.id, mine.c.labeler_id == _lab).scalar_subquery()
    q = select(_items.c.id, my_lease).where(
        _items.c.campaign_id == _cid,
        _items.c.complete == false(),  # "= false", not "IS false": only the former can use ix_items_campaign_complete_id
        blocked_for_me == 0,
        _slots_taken_of(_items.c.id) < _overlap,
    )
    if exclude_tried:
        q = q.where(_items.c.id.not_in(bindparam("tried", expanding=True)))
    return q.order_by(_items.c.id).limit(1).with_for_update(of=_items, skip_locked=skip_locked)


_PICK = Prepared(_pick(False, True))
_PICK_WAIT = Prepared(_pick(False, False))
_PICK_RETRY = (_pick(True, True), _pick(True, False))  # expanding IN: run through Connection.execute
# The lease is written only if the item still has a free slot, counted in this statement: on
# PostgreSQL (READ COMMITTED) it sees every lease committed before it, and the item row lock taken
# by the pick keeps new ones out until this transaction ends.
_NEW_LEASE = Prepared(
    insert(_assign)
    .from_select(
        ["item_id", "labeler_id", "campaign_id", "status", "leased_at", "expires_at"],
        select(_iid, _lab, _cid, literal("leased", String), _now, bindparam("expires", type_=DateTime)).where(_slots_taken_of(_iid) < _overlap),
    )
    .returning(_assign.c.id)
)
_RENEW_LEASE = Prepared(
    update(_assign)
    .where(_assign.c.id == bindparam("aid", type_=BigInteger()), _assign.c.status == "leased", _assign.c.expires_at <= _now, _slots_taken_of(_iid) < _overlap)
    .values(leased_at=_now, expires_at=bindparam("expires"))
)
_ITEM_PUBLIC = Prepared(select(_items.c.id, _items.c.campaign_id, _items.c.prompt, _items.c.messages, _items.c.created_at).where(_items.c.id == _iid))
_ANSWERS_PUBLIC = Prepared(
    select(_answers.c.id, _answers.c.text, _answers.c.model_id, _answers.c.model_version, _answers.c.sampling)
    .where(_answers.c.item_id == _iid)
    .order_by(_answers.c.position)
)
_ANSWER_IDS = Prepared(select(_answers.c.id).where(_answers.c.item_id == _iid))
_SET_STATUS = Prepared(update(_assign).where(_assign.c.id == bindparam("aid", type_=BigInteger())).values(status=bindparam("status")))
# The item, with the caller's assignment and ranking of it (if any), its campaign's overlap and
# whether the caller's token is still live, in one statement; on PostgreSQL the item row is
# locked, which serializes every check-then-write on that item.
_ITEM_CONTEXT = Prepared(
    select(
        _token_live(),
        _items.c.campaign_id,
        _campaigns.c.overlap,
        _assign.c.id,
        _assign.c.status,
        _assign.c.expires_at,
        _rank.c.id,
        _rank.c.ranking,
        _rank.c.rationale,
        _rank.c.created_at,
    )
    .select_from(
        _items.join(_campaigns, _campaigns.c.id == _items.c.campaign_id)
        .outerjoin(_assign, and_(_assign.c.item_id == _items.c.id, _assign.c.labeler_id == _lab))
        .outerjoin(_rank, and_(_rank.c.item_id == _items.c.id, _rank.c.labeler_id == _lab))
    )
    .where(_items.c.id == _iid)
    .with_for_update(of=_items)
)
_SLOTS_OTHERS = Prepared(select(_slots_taken_of(_iid, exclude_labeler=_lab)))
_NEW_RANKING = Prepared(
    insert(_rank)
    .values(item_id=_iid, labeler_id=_lab, campaign_id=_cid, ranking=bindparam("ranking", type_=_rank.c.ranking.type), rationale=bindparam("rationale", type_=Text()), created_at=_now)
    .returning(_rank.c.id)
)
# Set once the item has `overlap` rankings (rankings are final), under the item's lock (PostgreSQL)
# or the write lock (SQLite).
_MARK_COMPLETE = Prepared(
    update(_items)
    .where(_items.c.id == _iid, select(func.count()).select_from(_rank).where(_rank.c.item_id == _iid).scalar_subquery() >= _overlap)
    .values(complete=True)
)


def actor_for_token_hash(conn: Connection, token_hash: str) -> Actor | None:
    row = _ACTOR_BY_HASH.first(conn, h=token_hash)
    return Actor(row[0], row[1], row[2]) if row else None


def _lease_public(conn: Connection, assignment_id: int, campaign_id: int, expires: datetime, item_id: int) -> AssignmentPublic:
    item = _ITEM_PUBLIC.first(conn, iid=item_id)
    answers = [
        AnswerPublic.model_construct(id=a[0], text=a[1], model_id=a[2], model_version=a[3], sampling=a[4]) for a in _ANSWERS_PUBLIC.all(conn, iid=item_id)
    ]
    return lease_public(assignment_id, campaign_id, expires, item, answers)


def lease_public(assignment_id: int, campaign_id: int, expires: datetime, item: Sequence, answers: list[AnswerPublic]) -> AssignmentPublic:
    """A lease as the API returns it; ``item``: (id, campaign_id, prompt, messages, created_at)."""
    public = ItemPublic.model_construct(id=item[0], campaign_id=item[1], prompt=item[2], messages=item[3], answers=answers, created_at=item[4])
    return AssignmentPublic.model_construct(assignment_id=assignment_id, campaign_id=campaign_id, lease_expires_at=expires, item=public)


def _next_context(conn: Connection, campaign_id: int, actor: Actor, now: datetime) -> tuple:
    """(overlap, lease_seconds, oldest held lease id, its item id, its expiry): 401 if the
    caller's token was revoked meanwhile, 404 if there is no such campaign."""
    ctx = _NEXT_CONTEXT.first(conn, tid=actor.token_id, lab=actor.id, cid=campaign_id, now=now)
    if ctx is None:
        check_campaign_context(False, _TOKEN_LIVE.first(conn, tid=actor.token_id) is not None, campaign_id)
    check_campaign_context(True, bool(ctx[0]), campaign_id)
    return ctx[1:]


def check_campaign_context(found: bool, live: bool, campaign_id: int) -> None:
    """401 if the caller's token was revoked meanwhile (also for a missing campaign), else 404 for
    a missing campaign. Shared with the PostgreSQL function ``fs_lease`` (``hotpath.py``)."""
    if not live:
        raise Unauthorized("invalid or revoked token")
    if not found:
        raise NotFound(f"campaign {campaign_id} not found")


def _new_lease(conn: Connection, campaign_id: int, actor: Actor, now: datetime, overlap: int, lease_seconds: int, wait: bool = True) -> AssignmentPublic | None:
    """Lease an item the labeler has not ranked, skipped or leased, whose overlap is not yet
    taken; None when there is nothing left for them. ``wait=False``: never wait for an item row
    another transaction has locked (PostgreSQL), for a transaction that already holds item locks
    and could otherwise deadlock with one waiting for them."""
    params = {"cid": campaign_id, "lab": actor.id, "now": now, "overlap": overlap}
    expires = now + timedelta(seconds=lease_seconds)
    tried: list[int] = []
    for _ in range(64):
        if not tried:
            found = _PICK.first(conn, **params) or (_PICK_WAIT.first(conn, **params) if wait else None)
        else:  # every candidate so far was taken under our feet: look further, waiting for locks if need be
            skip_locked, waiting = _PICK_RETRY
            found = conn.execute(skip_locked, {**params, "tried": tried}).first()
            if found is None and wait:
                found = conn.execute(waiting, {**params, "tried": tried}).first()
        if found is None:
            return None
        item_id, my_expired_lease = found
        tried.append(item_id)
        if my_expired_lease is None:
            assignment_id = _NEW_LEASE.scalar(conn, iid=item_id, lab=actor.id, cid=campaign_id, now=now, expires=expires, overlap=overlap)
        elif _RENEW_LEASE.execute(conn, aid=my_expired_lease, iid=item_id, now=now, expires=expires, overlap=overlap) == 1:
            assignment_id = my_expired_lease
        else:
            assignment_id = None
        if assignment_id is not None:
            return _lease_public(conn, assignment_id, campaign_id, expires, item_id)
    return None


def next_assignment(conn: Connection, campaign_id: int, actor: Actor, now: datetime) -> AssignmentPublic | None:
    """The labeler's current lease in this campaign (the oldest), else a new lease; None when
    there is nothing left for them."""
    overlap, lease_seconds, current_id, current_item, current_expires = _next_context(conn, campaign_id, actor, now)
    if current_id is not None:
        return _lease_public(conn, current_id, campaign_id, current_expires, current_item)
    return _new_lease(conn, campaign_id, actor, now, overlap, lease_seconds)


def lease_items(conn: Connection, campaign_id: int, actor: Actor, now: datetime, count: int) -> list[AssignmentPublic]:
    """Up to ``count`` leases for this labeler in this campaign, oldest first: the unexpired
    leases they hold, topped up with new ones (for clients that keep a few items at hand)."""
    overlap, lease_seconds, current_id, _, _ = _next_context(conn, campaign_id, actor, now)
    out = []
    if current_id is not None:
        out = [_lease_public(conn, a, campaign_id, expires, i) for a, i, expires in _HELD.all(conn, lab=actor.id, cid=campaign_id, now=now, n=count)]
    # Wait for a locked item row only while this transaction holds no item lock of its own.
    while len(out) < count and (lease := _new_lease(conn, campaign_id, actor, now, overlap, lease_seconds, wait=not out)) is not None:
        out.append(lease)
    return out


def check_item_context(found: bool, live: bool, assignment_id: int | None, item_id: int, actor: Actor) -> None:
    """401 if the caller's token was revoked meanwhile (also for a missing item), 404 unless the
    item exists and the caller may see it. Shared with the PostgreSQL functions (``hotpath.py``)."""
    if not live:
        raise Unauthorized("invalid or revoked token")
    if not found:
        raise NotFound(f"item {item_id} not found")
    if actor.role != "admin" and assignment_id is None:
        raise NotFound(f"item {item_id} not found")  # 404, not 403: do not reveal other labelers' items


def _item_context(conn: Connection, item_id: int, actor: Actor) -> tuple:
    """(campaign_id, overlap, assignment id, status, expires_at, ranking id, ranking, rationale,
    created_at) for the item and the caller (locked on PostgreSQL); 401 if the caller's token
    was revoked meanwhile, 404 unless the caller may see the item."""
    ctx = _ITEM_CONTEXT.first(conn, tid=actor.token_id, iid=item_id, lab=actor.id)
    if ctx is None:
        check_item_context(False, _TOKEN_LIVE.first(conn, tid=actor.token_id) is not None, None, item_id, actor)
    check_item_context(True, bool(ctx[0]), ctx[3], item_id, actor)
    return ctx[1:]


def skip_allowed(item_id: int, assignment_id: int | None, status: str | None) -> None:
    """409 unless the caller holds the item and has not ranked it (then it is set to skipped)."""
    if assignment_id is None:
        raise Conflict(f"item {item_id} is not assigned to you")
    if status == "done":
        raise Conflict(f"you already ranked item {item_id}")


def skip_item(conn: Connection, item_id: int, actor: Actor, now: datetime) -> None:
    _, _, assignment_id, status, *_ = _item_context(conn, item_id, actor)
    skip_allowed(item_id, assignment_id, status)
    _SET_STATUS.execute(conn, aid=assignment_id, status="skipped")


def normalize_groups(data: RankingCreate) -> list[list[int]]:
    """The ranking as stored: tie groups, each sorted."""
    return [sorted(g) for g in data.groups()]


def validate_ranking(item_id: int, answer_ids: Iterable[int], groups: list[list[int]]) -> None:
    expected = set(answer_ids)
    seen: list[int] = [a for g in groups for a in g]
    problems = []
    dupes = sorted({a for a in seen if seen.count(a) > 1})
    if dupes:
        problems.append(f"answer ids listed more than once: {dupes}")
    unknown = sorted(set(seen) - expected)
    if unknown:
        problems.append(f"not answers of item {item_id}: {unknown}")
    missing = sorted(expected - set(seen))
    if missing:
        problems.append(f"missing answer ids: {missing}")
    if problems:
        msg = "; ".join(problems) + f" (the ranking must name exactly the item's answer ids {sorted(expected)})"
        raise Invalid(["body", "ranking"], msg, "ranking_invalid")


def ranking_outcome(
    item_id: int, actor: Actor, data: RankingCreate, groups: list[list[int]], ctx: Sequence, answer_ids: Iterable[int], slots_others: Callable[[], int], now: datetime
) -> RankingPublic | None:
    """The checks of a ranking after the item context (``_item_context``), in their order: raise
    the request's error, return the stored ranking for an idempotent replay, or None: store it.
    ``slots_others`` counts the item's slots held by others (asked only for an expired lease).
    Shared with the PostgreSQL function ``fs_rank`` (``hotpath.py``), which stores the ranking
    exactly when this returns None."""
    campaign_id, overlap, assignment_id, status, expires_at, ranking_id, stored, rationale, created_at = ctx
    validate_ranking(item_id, answer_ids, groups)
    if ranking_id is not None:
        if stored == groups and rationale == data.rationale:
            return RankingPublic.model_construct(
                id=ranking_id, item_id=item_id, campaign_id=campaign_id, labeler_id=actor.id, ranking=stored, rationale=rationale, created_at=created_at
            )
        raise Conflict(f"you already ranked item {item_id} differently (ranking {ranking_id}); rankings are final")
    if assignment_id is None:
        raise Conflict(f"item {item_id} is not assigned to you: ask for the next item first")
    if status == "skipped":
        raise Conflict(f"you skipped item {item_id}")
    if expires_at <= now and slots_others() >= overlap:
        raise Conflict(f"your lease on item {item_id} expired and the item went to other labelers")
    return None


def submit_ranking(conn: Connection, item_id: int, actor: Actor, data: RankingCreate, now: datetime) -> tuple[RankingPublic, bool]:
    """Store a ranking; (ranking, created). Re-posting the same ranking returns the stored one."""
    ctx = _item_context(conn, item_id, actor)
    groups = normalize_groups(data)
    answer_ids = [r[0] for r in _ANSWER_IDS.all(conn, iid=item_id)]
    same = ranking_outcome(item_id, actor, data, groups, ctx, answer_ids, lambda: _SLOTS_OTHERS.scalar(conn, iid=item_id, now=now, lab=actor.id), now)
    if same is not None:
        return same, False
    campaign_id, overlap, assignment_id = ctx[0], ctx[1], ctx[2]
    _SET_STATUS.execute(conn, aid=assignment_id, status="done")
    new_id = _NEW_RANKING.scalar(conn, iid=item_id, lab=actor.id, cid=campaign_id, ranking=groups, rationale=data.rationale, now=now)
    _MARK_COMPLETE.execute(conn, iid=item_id, overlap=overlap)
    return new_ranking(new_id, item_id, campaign_id, actor, groups, data, now), True


def new_ranking(ranking_id: int, item_id: int, campaign_id: int, actor: Actor, groups: list[list[int]], data: RankingCreate, now: datetime) -> RankingPublic:
    return RankingPublic.model_construct(
        id=ranking_id, item_id=item_id, campaign_id=campaign_id, labeler_id=actor.id, ranking=groups, rationale=data.rationale, created_at=now
    )


def get_ranking_for(session: Session, ranking_id: int, actor: Labeler) -> Ranking:
    ranking = session.get(Ranking, ranking_id)
    if ranking is None or (actor.role != "admin" and ranking.labeler_id != actor.id):
        raise NotFound(f"ranking {ranking_id} not found")
    return ranking


def list_rankings(session: Session, actor: Labeler, campaign_id: int | None, labeler_id: int | None, offset: int, limit: int) -> Sequence[Ranking]:
    q = select(Ranking).order_by(Ranking.id).offset(offset).limit(limit)
    if actor.role != "admin":
        if labeler_id is not None and labeler_id != actor.id:
            raise Forbidden("labelers may list only their own rankings")
        labeler_id = actor.id
    if labeler_id is not None:
        q = q.where(Ranking.labeler_id == labeler_id)
    if campaign_id is not None:
        q = q.where(Ranking.campaign_id == campaign_id)
    return session.scalars(q).all()


# ---- progress and stats --------------------------------------------------------------------


def _count(session: Session, q) -> int:  # noqa: ANN001
    return session.scalar(q) or 0


def _items_complete(session: Session, campaign: Campaign) -> int:
    per_item = select(Ranking.item_id).where(Ranking.campaign_id == campaign.id).group_by(Ranking.item_id).having(func.count() >= campaign.overlap).subquery()
    return _count(session, select(func.count()).select_from(per_item))


def progress(session: Session, campaign: Campaign, labeler: Labeler) -> Progress:
    by_me = select(func.count()).select_from(Assignment).where(Assignment.campaign_id == campaign.id, Assignment.labeler_id == labeler.id)
    return Progress(
        campaign_id=campaign.id,
        items_total=_count(session, select(func.count()).select_from(Item).where(Item.campaign_id == campaign.id)),
        items_complete=_items_complete(session, campaign),
        my_rankings=_count(session, by_me.where(Assignment.status == "done")),
        my_skips=_count(session, by_me.where(Assignment.status == "skipped")),
    )


def stats(session: Session, campaign: Campaign, now: datetime, since_watermark: int | None = None) -> CampaignStats:
    n_items = _count(session, select(func.count()).select_from(Item).where(Item.campaign_id == campaign.id))
    in_campaign = select(func.count()).select_from(Assignment).where(Assignment.campaign_id == campaign.id)
    rankings = _count(session, select(func.count()).select_from(Ranking).where(Ranking.campaign_id == campaign.id))
    active = _count(session, in_campaign.where(Assignment.status == "leased", Assignment.expires_at > now))
    max_id = _count(session, select(func.max(Ranking.id)).where(Ranking.campaign_id == campaign.id))
    if since_watermark:
        since = _count(session, select(func.count()).select_from(Ranking).where(Ranking.campaign_id == campaign.id, Ranking.id > since_watermark))
    else:
        since = rankings
    return CampaignStats(
        campaign_id=campaign.id,
        items=n_items,
        items_complete=_items_complete(session, campaign),
        rankings=rankings,
        skips=_count(session, in_campaign.where(Assignment.status == "skipped")),
        active_leases=active,
        queue_depth=queue_depth(session, campaign, now),
        labelers=_count(session, select(func.count(func.distinct(Ranking.labeler_id))).where(Ranking.campaign_id == campaign.id)),
        max_ranking_id=max_id,
        rankings_since=since,
    )


def _holds_slot(now: datetime):  # noqa: ANN202
    """An assignment counts against overlap when done, or leased and not yet expired."""
    return or_(Assignment.status == "done", and_(Assignment.status == "leased", Assignment.expires_at > now))


def queue_depth(session: Session, campaign: Campaign, now: datetime) -> int:
    taken = select(func.count()).select_from(Assignment).where(Assignment.item_id == Item.id, _holds_slot(now)).scalar_subquery()
    need = func.max(0, campaign.overlap - taken) if not _is_pg(session) else func.greatest(0, campaign.overlap - taken)
    return int(session.scalar(select(func.coalesce(func.sum(need), 0)).where(Item.campaign_id == campaign.id)) or 0)


def total_queue_depth(session: Session, now: datetime) -> int:
    return sum(queue_depth(session, c, now) for c in list_campaigns(session))


# ---- export --------------------------------------------------------------------------------


def _iso(dt: datetime) -> str:
    return dt.replace(tzinfo=timezone.utc).isoformat()


def create_export(session: Session, campaign: Campaign, params: ExportCreate, now: datetime) -> Export:
    """Snapshot preference pairs into a new immutable export version.

    The watermark is the largest ranking id at snapshot time. On PostgreSQL the SHARE lock waits
    for in-flight ranking inserts to commit and blocks new ones meanwhile, so no ranking with a
    smaller id can appear after the watermark was taken (SQLite: the transaction holds the lock).
    An item enters an export once it has ``min_rankings`` rankings; an incremental export takes
    items that reached that count after ``since`` (and, with aggregation 'none', also rankings
    added after ``since`` to items that had reached it before).
    """
    if _is_pg(session):
        session.execute(text("LOCK TABLE rankings IN SHARE MODE"))
    since = params.since_watermark or 0
    if params.since_last:
        last = session.scalar(select(Export).where(Export.campaign_id == campaign.id).order_by(Export.id.desc()).limit(1))
        since = last.watermark if last else 0
    watermark = max(since, session.scalar(select(func.max(Ranking.id))) or 0)
    k = params.min_rankings or (1 if params.aggregation == "none" else campaign.overlap)

    touched = select(Ranking.item_id).where(Ranking.campaign_id == campaign.id, Ranking.id > since, Ranking.id <= watermark)
    by_item: dict[int, list[Ranking]] = defaultdict(list)
    for r in session.scalars(
        select(Ranking).where(Ranking.campaign_id == campaign.id, Ranking.id <= watermark, Ranking.item_id.in_(touched)).order_by(Ranking.id)
    ):
        by_item[r.item_id].append(r)
    items = {i.id: i for i in session.scalars(select(Item).where(Item.id.in_(list(by_item))))} if by_item else {}

    rows: list[dict] = []
    dropped: list[int] = []
    for item_id in sorted(by_item):
        ranked = by_item[item_id]
        if len(ranked) < k:
            continue
        completed_by = ranked[k - 1].id
        if params.aggregation == "none":
            units = [[r] for r in ranked if max(r.id, completed_by) > since]
        elif completed_by > since:
            units = [ranked]
        else:
            continue  # already exported when it reached min_rankings
        if params.max_disagreement is not None and pairs.disagreement([r.ranking for r in ranked]) > params.max_disagreement:
            dropped.append(item_id)
            continue
        item = items[item_id]
        text_of = {a.id: a.text for a in item.answers}
        for unit in units:
            for chosen, rejected, margin in pairs.item_pairs([r.ranking for r in unit], params.strategy, params.aggregation):
                row = {
                    "prompt": item.prompt,
                    "chosen": text_of[chosen],
                    "rejected": text_of[rejected],
                    "margin": round(margin, 6),
                    "item_id": item_id,
                    "campaign": campaign.name,
                    "labeler_ids": sorted(r.labeler_id for r in unit),
                    "created_at": _iso(max(r.created_at for r in unit)),
                }
                if item.messages is not None:
                    row["messages"] = item.messages
                rows.append(row)

    export = Export(
        campaign_id=campaign.id,
        params={**params.model_dump(), "min_rankings": k, "dropped_items": dropped},
        since_watermark=since,
        watermark=watermark,
        row_count=len(rows),
        created_at=now,
    )
    session.add(export)
    session.flush()
    if rows:
        session.execute(insert(ExportRow), [{"export_id": export.id, "seq": n, "row": row} for n, row in enumerate(rows)])
    return export


def get_export(session: Session, export_id: int) -> Export:
    export = session.get(Export, export_id)
    if export is None:
        raise NotFound(f"export {export_id} not found")
    return export


def list_exports(session: Session, campaign_id: int | None) -> Sequence[Export]:
    q = select(Export).order_by(Export.id)
    if campaign_id is not None:
        q = q.where(Export.campaign_id == campaign_id)
    return session.scalars(q).all()


def export_rows(session: Session, export_id: int, offset: int = 0, limit: int | None = None) -> list[dict]:
    q = select(ExportRow.row).where(ExportRow.export_id == export_id).order_by(ExportRow.seq).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    return list(session.scalars(q))


# ---- quality -------------------------------------------------------------------------------


def campaign_quality(session: Session, campaign: Campaign) -> CampaignQuality:
    by_item: dict[int, dict[int, list[list[int]]]] = defaultdict(dict)
    n = 0
    for item_id, labeler_id, groups in session.execute(select(Ranking.item_id, Ranking.labeler_id, Ranking.ranking).where(Ranking.campaign_id == campaign.id)):
        by_item[item_id][labeler_id] = groups
        n += 1
    gold = dict(session.execute(select(Item.id, Item.gold_answer_id).where(Item.campaign_id == campaign.id, Item.gold_answer_id.is_not(None))).all())
    labelers = {lab.id: lab for lab in session.scalars(select(Labeler).where(Labeler.id.in_({lab for r in by_item.values() for lab in r})))}
    per_labeler = []
    for lab_id in sorted(labelers):
        agreement, n_pairs = quality.labeler_agreement(by_item, lab_id)
        gold_rankings = [(by_lab[lab_id], gold[item]) for item, by_lab in by_item.items() if item in gold and lab_id in by_lab]
        accuracy, n_gold = quality.gold_accuracy(gold_rankings)
        per_labeler.append(
            LabelerQuality(
                labeler_id=lab_id,
                name=labelers[lab_id].name,
                rankings=sum(lab_id in by_lab for by_lab in by_item.values()),
                agreement=agreement,
                agreement_pairs=n_pairs,
                gold_items=n_gold,
                gold_accuracy=accuracy,
            )
        )
    return CampaignQuality(
        campaign_id=campaign.id,
        alpha=quality.krippendorff_alpha(by_item),
        items_multi_ranked=sum(len(v) >= 2 for v in by_item.values()),
        rankings=n,
        labelers=per_labeler,
    )
