-- Shard-local schema: the items, the slots this shard owns, and the functions that
-- read and write items with slot fencing in the same statement.

-- Slot ownership as this shard sees it.  Only 'owned' slots accept writes; 'owned' and
-- 'frozen' slots answer reads.  'importing' (being copied in) and 'moved' (handed over)
-- answer nothing, so a stale router is refused rather than served stale data.
CREATE TABLE shardd_slots (
    slot        integer PRIMARY KEY,
    state       text NOT NULL CHECK (state IN ('owned', 'importing', 'frozen', 'moved')),
    changed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shardd_items (
    tbl         text COLLATE "C" NOT NULL,
    pk          text COLLATE "C" NOT NULL,
    sk          text COLLATE "C" NOT NULL,
    slot        integer NOT NULL,
    version     bigint NOT NULL CHECK (version > 0),
    doc         jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tbl, pk, sk)
);
CREATE INDEX shardd_items_slot ON shardd_items (slot);

-- Advisory-lock class for slot locks: writes hold it shared, a freeze takes it
-- exclusively, so a freeze waits exactly for the writes already in flight.
CREATE FUNCTION shardd_slot_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 1936221284 $$;

-- Refuse a write unless this shard owns the slot.  SQLSTATE SD001 tells shardd to
-- refresh its slot map and retry.  Runs inside the writing transaction.
CREATE FUNCTION shardd_fence_write(p_slot integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), p_slot);
    SELECT state INTO st FROM shardd_slots WHERE slot = p_slot;
    IF st IS DISTINCT FROM 'owned' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD001',
            MESSAGE = format('slot %s is %s on this shard', p_slot, coalesce(st, 'not owned'));
    END IF;
END $$;

CREATE FUNCTION shardd_precondition_failed(p_expected bigint, p_current bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'SD412',
        MESSAGE = format('expected version %s, item is at %s',
                         p_expected, coalesce(p_current::text, 'absent')),
        DETAIL = coalesce(p_current, 0)::text;
END $$;

-- RFC 7396 JSON merge patch.
CREATE FUNCTION shardd_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    result jsonb;
    k text;
    v jsonb;
BEGIN
    IF jsonb_typeof(patch) IS DISTINCT FROM 'object' THEN
        RETURN patch;
    END IF;
    IF jsonb_typeof(target) IS DISTINCT FROM 'object' THEN
        result := '{}'::jsonb;
    ELSE
        result := target;
    END IF;
    FOR k, v IN SELECT * FROM jsonb_each(patch) LOOP
        IF jsonb_typeof(v) = 'null' THEN
            result := result - k;
        ELSE
            result := result || jsonb_build_object(k, shardd_merge_patch(result -> k, v));
        END IF;
    END LOOP;
    RETURN result;
END $$;

-- Condition p_if_version: NULL = none, 0 = item must be absent, n = item must be at n.

CREATE FUNCTION shardd_put(
    p_slot integer, p_tbl text, p_pk text, p_sk text, p_doc jsonb, p_if_version bigint,
    OUT version bigint, OUT created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
BEGIN
    PERFORM shardd_fence_write(p_slot);
    IF p_if_version IS NULL THEN
        INSERT INTO shardd_items AS i (tbl, pk, sk, slot, version, doc)
        VALUES (p_tbl, p_pk, p_sk, p_slot, 1, p_doc)
        ON CONFLICT (tbl, pk, sk) DO UPDATE
            SET version = i.version + 1, doc = excluded.doc, updated_at = now()
        RETURNING i.version, i.version = 1 INTO version, created;
    ELSIF p_if_version = 0 THEN
        INSERT INTO shardd_items (tbl, pk, sk, slot, version, doc)
        VALUES (p_tbl, p_pk, p_sk, p_slot, 1, p_doc)
        ON CONFLICT (tbl, pk, sk) DO NOTHING
        RETURNING 1, true INTO version, created;
        IF NOT FOUND THEN
            SELECT i.version INTO cur FROM shardd_items i
            WHERE i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk;
            PERFORM shardd_precondition_failed(p_if_version, cur);
        END IF;
    ELSE
        UPDATE shardd_items AS i
        SET version = i.version + 1, doc = p_doc, updated_at = now()
        WHERE i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk AND i.version = p_if_version
        RETURNING i.version, false INTO version, created;
        IF NOT FOUND THEN
            SELECT i.version INTO cur FROM shardd_items i
            WHERE i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk;
            PERFORM shardd_precondition_failed(p_if_version, cur);
        END IF;
    END IF;
END $$;

-- Returns the new version and document, or NULLs when the item does not exist.
CREATE FUNCTION shardd_patch(
    p_slot integer, p_tbl text, p_pk text, p_sk text, p_patch jsonb, p_if_version bigint,
    OUT version bigint, OUT doc jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
BEGIN
    PERFORM shardd_fence_write(p_slot);
    UPDATE shardd_items AS i
    SET version = i.version + 1, doc = shardd_merge_patch(i.doc, p_patch), updated_at = now()
    WHERE i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk
      AND (p_if_version IS NULL OR i.version = p_if_version)
    RETURNING i.version, i.doc INTO version, doc;
    IF NOT FOUND AND p_if_version IS NOT NULL THEN
        SELECT i.version INTO cur FROM shardd_items i
        WHERE i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk;
        PERFORM shardd_precondition_failed(p_if_version, cur);
    END IF;
END $$;

-- Returns the deleted version, or NULL when the item did not exist.
CREATE FUNCTION shardd_delete(
    p_slot integer, p_tbl text, p_pk text, p_sk text, p_if_version bigint,
    OUT version bigint)
LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
BEGIN
    PERFORM shardd_fence_write(p_slot);
    DELETE FROM shardd_items AS i
    WHERE i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk
      AND (p_if_version IS NULL OR p_if_version = 0 OR i.version = p_if_version)
    RETURNING i.version INTO version;
    IF p_if_version IS NOT NULL AND (version IS NULL) <> (p_if_version = 0) THEN
        SELECT i.version INTO cur FROM shardd_items i
        WHERE i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk;
        PERFORM shardd_precondition_failed(p_if_version, cur);
    END IF;
END $$;

-- One write as its own transaction, returning the WAL position after its commit: the
-- session token.  A replica whose replay position has reached it has the write.
CREATE PROCEDURE shardd_write(
    p_op text, p_slot integer, p_tbl text, p_pk text, p_sk text, p_doc jsonb,
    p_if_version bigint,
    INOUT version bigint DEFAULT NULL, INOUT created boolean DEFAULT NULL,
    INOUT doc jsonb DEFAULT NULL, INOUT lsn pg_lsn DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_op = 'put' THEN
        SELECT w.version, w.created INTO version, created
        FROM shardd_put(p_slot, p_tbl, p_pk, p_sk, p_doc, p_if_version) w;
    ELSIF p_op = 'patch' THEN
        SELECT w.version, w.doc INTO version, doc
        FROM shardd_patch(p_slot, p_tbl, p_pk, p_sk, p_doc, p_if_version) w;
    ELSIF p_op = 'delete' THEN
        version := shardd_delete(p_slot, p_tbl, p_pk, p_sk, p_if_version);
    ELSE
        RAISE EXCEPTION 'unknown write op %', p_op;
    END IF;
    COMMIT;
    lsn := pg_current_wal_lsn();
END $$;

-- Has this node replayed up to p_min_lsn?  A primary always has.
CREATE FUNCTION shardd_caught_up(p_min_lsn pg_lsn) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_min_lsn IS NULL OR NOT pg_is_in_recovery()
           OR coalesce(pg_last_wal_replay_lsn() >= p_min_lsn, false)
$$;

-- Point read, fenced in the same query: state is NULL or not owned/frozen when this
-- shard may not answer for the slot; caught_up is false when a replica is behind the
-- caller's session token (the caller then reads elsewhere).
CREATE FUNCTION shardd_get(p_slot integer, p_tbl text, p_pk text, p_sk text, p_min_lsn pg_lsn)
RETURNS TABLE (state text, caught_up boolean, version bigint, doc jsonb)
LANGUAGE sql STABLE AS $$
    SELECT s.state, shardd_caught_up(p_min_lsn), i.version, i.doc
    FROM (SELECT 1) AS one
    LEFT JOIN shardd_slots s ON s.slot = p_slot
    LEFT JOIN shardd_items i
        ON s.state IN ('owned', 'frozen')
       AND i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk
$$;

-- One partition's items in sort-key order, fenced like shardd_get.  The first row
-- always carries state and caught_up; item columns are NULL when nothing matches.
CREATE FUNCTION shardd_query(
    p_slot integer, p_tbl text, p_pk text, p_prefix text, p_after text, p_limit integer,
    p_min_lsn pg_lsn)
RETURNS TABLE (state text, caught_up boolean, sk text, version bigint, doc jsonb)
LANGUAGE sql STABLE AS $$
    SELECT s.state, shardd_caught_up(p_min_lsn), i.sk, i.version, i.doc
    FROM (SELECT 1) AS one
    LEFT JOIN shardd_slots s ON s.slot = p_slot
    LEFT JOIN LATERAL (
        SELECT it.sk, it.version, it.doc FROM shardd_items it
        WHERE s.state IN ('owned', 'frozen')
          AND it.tbl = p_tbl AND it.pk = p_pk
          AND (p_after IS NULL OR it.sk > p_after)
          AND it.sk >= coalesce(p_prefix, '')
          AND starts_with(it.sk, coalesce(p_prefix, ''))
        ORDER BY it.sk
        LIMIT p_limit
    ) i ON true
$$;

-- One page of a table's items on this shard in (pk, sk) order, after the given key.
-- Rows of slots this shard may not answer for are left out.
CREATE FUNCTION shardd_scan(
    p_tbl text, p_after_pk text, p_after_sk text, p_limit integer, p_min_lsn pg_lsn)
RETURNS TABLE (caught_up boolean, pk text, sk text, version bigint, doc jsonb)
LANGUAGE sql STABLE AS $$
    SELECT shardd_caught_up(p_min_lsn), i.pk, i.sk, i.version, i.doc
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT it.pk, it.sk, it.version, it.doc FROM shardd_items it
        JOIN shardd_slots s ON s.slot = it.slot AND s.state IN ('owned', 'frozen')
        WHERE it.tbl = p_tbl
          AND (p_after_pk IS NULL OR (it.pk, it.sk) > (p_after_pk, p_after_sk))
        ORDER BY it.pk, it.sk
        LIMIT p_limit
    ) i ON true
$$;
