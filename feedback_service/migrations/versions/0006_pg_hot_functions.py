"""PostgreSQL: the labeling hot paths (lease, rank, skip) as server-side functions, one statement
per request (``feedback_service/hotpath.py``). SQLite: nothing.

Each function runs the same statements, in the same order and with the same row locks, as the
Python units of ``service.py`` (``_next_context``/``_new_lease``/``lease_items``, ``submit_ranking``,
``skip_item``); every statement of a PL/pgSQL function takes a fresh snapshot (READ COMMITTED),
exactly like the units' separate statements. The functions never raise for a refused request:
they return what the Python checks need (token live, item context, answer ids), write only when
those checks pass, and ``hotpath.py`` turns the returned row into the same answer or error as on
SQLite, with the same Python checks. ``p_wait`` false (a call inside a group commit): where the
unit would wait for an item row that another transaction locks, the function writes nothing and
says "busy"; the call then runs again on its own, with ``p_wait`` true.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TOKEN_LIVE = """EXISTS (SELECT 1 FROM api_tokens t JOIN labelers l ON l.id = t.labeler_id
                         WHERE t.id = p_tid AND t.revoked_at IS NULL AND l.active IS true)"""

# The pick of service._pick: the campaign's lowest open item this labeler has not ranked, skipped
# or currently leased and that has a free slot, with this labeler's (expired) lease on it.
_PICK_WHERE = """
          FROM items i
         WHERE i.campaign_id = p_cid AND i.complete = false
           AND (SELECT count(*) FROM assignments m WHERE m.item_id = i.id AND m.labeler_id = p_lab
                 AND (m.status <> 'leased' OR m.expires_at > p_now)) = 0
           AND (SELECT count(*) FROM assignments s WHERE s.item_id = i.id
                 AND (s.status = 'done' OR (s.status = 'leased' AND s.expires_at > p_now))) < v_overlap
           AND i.id <> ALL (v_tried)"""
_PICK = (
    """
        SELECT i.id, (SELECT m.id FROM assignments m WHERE m.item_id = i.id AND m.labeler_id = p_lab)
          INTO v_item, v_mine"""
    + _PICK_WHERE
    + """
         ORDER BY i.id LIMIT 1
           FOR UPDATE OF i"""
)
_PICK_SKIP_LOCKED = _PICK + " SKIP LOCKED"
_PICK_WAIT = _PICK
# Whether the pick would find an item if it waited for the rows others lock: the same filters,
# without locks (what waiting would find, this finds now).
_PICK_PROBE = """
        PERFORM 1""" + _PICK_WHERE + """
         LIMIT 1"""

# Assignments of the new lease's item that count against its overlap: done, or leased and not
# yet expired (service._slots_taken_of).
_SLOTS_OF_ITEM = """(SELECT count(*) FROM assignments s WHERE s.item_id = v_item
              AND (s.status = 'done' OR (s.status = 'leased' AND s.expires_at > p_now)))"""

# The leased item as the API shows it (service._lease_public), its answers as a JSON array.
_ITEM_PUBLIC = """SELECT i.campaign_id, i.prompt, i.messages, i.created_at,
               (SELECT json_agg(json_build_object('id', a.id, 'text', a.text, 'model_id', a.model_id,
                                                  'model_version', a.model_version, 'sampling', a.sampling) ORDER BY a.position)
                  FROM answers a WHERE a.item_id = i.id)
          INTO r_campaign_id, r_prompt, r_messages, r_created_at, r_answers
          FROM items i WHERE i.id = {item}"""
_ITEM_PUBLIC_HELD = _ITEM_PUBLIC.format(item="v_held.item_id")
_ITEM_PUBLIC_NEW = _ITEM_PUBLIC.format(item="v_item")

FS_LEASE = f"""
CREATE OR REPLACE FUNCTION fs_lease(p_tid bigint, p_lab bigint, p_cid bigint, p_now timestamp, p_count integer, p_wait boolean)
RETURNS TABLE (r_state text, r_assignment_id bigint, r_expires_at timestamp, r_item_id bigint, r_campaign_id bigint,
               r_prompt text, r_messages json, r_created_at timestamp, r_answers json)
LANGUAGE plpgsql AS $$
DECLARE
    v_live boolean;
    v_overlap integer;
    v_lease_seconds integer;
    v_expires timestamp;
    v_n integer := 0;
    v_wait boolean;
    v_item bigint;
    v_mine bigint;
    v_aid bigint;
    v_tried bigint[];
    v_held record;
BEGIN
    -- service._next_context: the token and the campaign's settings (no campaign: 401, else 404)
    SELECT {_TOKEN_LIVE}, c.overlap, c.lease_seconds INTO v_live, v_overlap, v_lease_seconds
      FROM (SELECT 1) one LEFT JOIN campaigns c ON c.id = p_cid;
    IF v_overlap IS NULL OR NOT v_live THEN
        r_state := CASE WHEN v_live THEN 'no_campaign' ELSE 'revoked' END;
        RETURN NEXT;
        RETURN;
    END IF;
    -- the unexpired leases the labeler holds in the campaign, oldest first (service._HELD)
    FOR v_held IN
        SELECT a.id, a.item_id, a.expires_at FROM assignments a
         WHERE a.labeler_id = p_lab AND a.campaign_id = p_cid AND a.status = 'leased' AND a.expires_at > p_now
         ORDER BY a.id LIMIT p_count
    LOOP
        r_state := 'lease';
        r_assignment_id := v_held.id;
        r_expires_at := v_held.expires_at;
        r_item_id := v_held.item_id;
        {_ITEM_PUBLIC_HELD};
        RETURN NEXT;
        v_n := v_n + 1;
    END LOOP;
    -- topped up with new leases (service._new_lease); wait for a locked item row only while this
    -- transaction holds no lease of its own
    v_expires := p_now + make_interval(secs => v_lease_seconds);
    WHILE v_n < p_count LOOP
        v_wait := v_n = 0;
        v_aid := NULL;
        v_tried := '{{}}';
        FOR k IN 1..64 LOOP
            {_PICK_SKIP_LOCKED};
            IF NOT FOUND AND v_wait THEN
                IF p_wait THEN
                    {_PICK_WAIT};
                ELSE  -- in a group commit, which never waits for a row lock: to be run alone, if
                      -- waiting would find an item
                    {_PICK_PROBE};
                    IF FOUND THEN
                        r_state := 'busy';
                        RETURN NEXT;
                        RETURN;
                    END IF;
                END IF;
            END IF;
            EXIT WHEN NOT FOUND;
            v_tried := v_tried || v_item;
            IF v_mine IS NULL THEN
                INSERT INTO assignments (item_id, labeler_id, campaign_id, status, leased_at, expires_at)
                SELECT v_item, p_lab, p_cid, 'leased', p_now, v_expires WHERE {_SLOTS_OF_ITEM} < v_overlap
                RETURNING id INTO v_aid;
            ELSE
                UPDATE assignments SET leased_at = p_now, expires_at = v_expires
                 WHERE id = v_mine AND status = 'leased' AND expires_at <= p_now AND {_SLOTS_OF_ITEM} < v_overlap;
                IF FOUND THEN
                    v_aid := v_mine;
                END IF;
            END IF;
            EXIT WHEN v_aid IS NOT NULL;
        END LOOP;
        EXIT WHEN v_aid IS NULL;  -- nothing left for this labeler
        r_state := 'lease';
        r_assignment_id := v_aid;
        r_expires_at := v_expires;
        r_item_id := v_item;
        {_ITEM_PUBLIC_NEW};
        RETURN NEXT;
        v_n := v_n + 1;
    END LOOP;
    IF v_n = 0 THEN
        r_state := 'none';
        RETURN NEXT;
    END IF;
END
$$"""

# The item context of service._item_context, with the token check in the same statement (the item
# row locked); no item: the token check alone. {extra}: more columns. Without p_wait (in a group
# commit) a row lock held by another transaction is not waited for: r_busy, to be run alone.
_ITEM_CONTEXT_SELECT = """
        SELECT true, {token_live}, i.campaign_id, c.overlap, a.id, a.status, a.expires_at, r.id, r.ranking, r.rationale, r.created_at{extra}
          INTO r_found, r_live, r_campaign_id, r_overlap, r_assignment_id, r_status, r_expires_at, r_ranking_id, r_ranking, r_rationale, r_created_at{into}
          FROM items i
          JOIN campaigns c ON c.id = i.campaign_id
          LEFT JOIN assignments a ON a.item_id = i.id AND a.labeler_id = p_lab
          LEFT JOIN rankings r ON r.item_id = i.id AND r.labeler_id = p_lab
         WHERE i.id = p_iid
           FOR UPDATE OF i"""
_ITEM_CONTEXT = """
    IF p_wait THEN{select};
    ELSE{select} SKIP LOCKED;
    END IF;
    IF NOT FOUND THEN
        r_found := false;
        r_live := {token_live};
        r_busy := NOT p_wait AND EXISTS (SELECT 1 FROM items WHERE id = p_iid);
        RETURN NEXT;
        RETURN;
    END IF;
    IF NOT r_live THEN
        RETURN NEXT;
        RETURN;
    END IF;"""

_CONTEXT_COLUMNS = """r_found boolean, r_live boolean, r_campaign_id bigint, r_overlap integer, r_assignment_id bigint, r_status text,
               r_expires_at timestamp, r_ranking_id bigint, r_ranking json, r_rationale text, r_created_at timestamp"""

_RANK_CONTEXT = _ITEM_CONTEXT.format(
    token_live=_TOKEN_LIVE,
    select=_ITEM_CONTEXT_SELECT.format(
        token_live=_TOKEN_LIVE, extra=",\n               ARRAY(SELECT n.id FROM answers n WHERE n.item_id = i.id ORDER BY n.id)", into=", r_answer_ids"
    ),
)
_SKIP_CONTEXT = _ITEM_CONTEXT.format(token_live=_TOKEN_LIVE, select=_ITEM_CONTEXT_SELECT.format(token_live=_TOKEN_LIVE, extra="", into=""))

# p_ids: the answer ids the ranking names, sorted (duplicates kept): the ranking is valid when they
# equal the item's answer ids (service.validate_ranking). r_slots_others is only counted when the
# lease has expired. r_new_id: the new ranking's id when it was stored. The three writes of
# service.submit_ranking in one statement: the item is complete once it has `overlap` rankings,
# counting the new one (invisible to this statement's snapshot; under the item's lock no other
# ranking of it can be added meanwhile).
FS_RANK = f"""
CREATE OR REPLACE FUNCTION fs_rank(p_tid bigint, p_iid bigint, p_lab bigint, p_ids bigint[], p_ranking text, p_rationale text, p_now timestamp,
                                   p_wait boolean)
RETURNS TABLE ({_CONTEXT_COLUMNS}, r_answer_ids bigint[], r_slots_others bigint, r_new_id bigint, r_busy boolean)
LANGUAGE plpgsql AS $$
BEGIN
    {_RANK_CONTEXT}
    IF r_answer_ids <> p_ids OR r_ranking_id IS NOT NULL OR r_assignment_id IS NULL OR r_status = 'skipped' THEN
        RETURN NEXT;
        RETURN;
    END IF;
    IF r_expires_at <= p_now THEN
        r_slots_others := (SELECT count(*) FROM assignments s WHERE s.item_id = p_iid AND s.labeler_id <> p_lab
                             AND (s.status = 'done' OR (s.status = 'leased' AND s.expires_at > p_now)));
        IF r_slots_others >= r_overlap THEN
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    WITH done AS (UPDATE assignments SET status = 'done' WHERE id = r_assignment_id),
         complete AS (UPDATE items SET complete = true
                       WHERE id = p_iid AND (SELECT count(*) FROM rankings k WHERE k.item_id = p_iid) + 1 >= r_overlap)
    INSERT INTO rankings (item_id, labeler_id, campaign_id, ranking, rationale, created_at)
    VALUES (p_iid, p_lab, r_campaign_id, p_ranking::json, p_rationale, p_now)
    RETURNING id INTO r_new_id;
    RETURN NEXT;
END
$$"""

# r_skipped: the assignment was set to skipped.
FS_SKIP = f"""
CREATE OR REPLACE FUNCTION fs_skip(p_tid bigint, p_iid bigint, p_lab bigint, p_wait boolean)
RETURNS TABLE ({_CONTEXT_COLUMNS}, r_skipped boolean, r_busy boolean)
LANGUAGE plpgsql AS $$
BEGIN
    {_SKIP_CONTEXT}
    r_skipped := r_assignment_id IS NOT NULL AND r_status <> 'done';
    IF r_skipped THEN
        UPDATE assignments SET status = 'skipped' WHERE id = r_assignment_id;
    END IF;
    RETURN NEXT;
END
$$"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for ddl in (FS_LEASE, FS_RANK, FS_SKIP):
        op.execute(ddl)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION fs_skip(bigint, bigint, bigint, boolean)")
    op.execute("DROP FUNCTION fs_rank(bigint, bigint, bigint, bigint[], text, text, timestamp, boolean)")
    op.execute("DROP FUNCTION fs_lease(bigint, bigint, bigint, timestamp, integer, boolean)")
