-- Idempotency keys: a write that carries one records its outcome in the same transaction,
-- so a retry with the same key (after a lost response) returns that outcome and changes
-- nothing.
--
-- A record is an item of an internal table "~idem:<window>:<bucket>" with the written
-- item's pk, so it lives in the item's slot: it is written in the item's transaction, replicated with it,
-- moved with the slot, and survives a failover exactly as the item does.  (A claim of
-- the key, pk "<caller>:<key>", detects the key's reuse for another request.)  Its sk is
-- "<caller>:<op index>:<key>" (the caller: a digest of the bearer token; the index: the
-- op's place in its request, 0 for a single write).  Its document holds the request's
-- digest and the outcome: {"hash", "version", "created", "doc"}.
--
-- The table names a time bucket: <bucket> = floor(epoch seconds / <window>), the window
-- being the retention.  Lookups read the current bucket and the one before, so a record
-- is found for at least one window, and a bucket is trimmed as a whole (by the primary
-- key's prefix, no index on time) once it is older than a window (shardd_trim_once).
--
-- While a request with a key is being applied its transaction holds an advisory lock on
-- the key (one 64-bit hash, a lock tag of its own): a duplicate that arrives meanwhile is
-- refused at once (SQLSTATE SD409) rather than waiting or applying twice.  The lock is
-- released after the commit is visible, so a duplicate that gets it finds the record.

CREATE FUNCTION shardd_once_lock(p_lock text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtextextended(p_lock, 0)) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD409',
            MESSAGE = 'a request with this Idempotency-Key is still being applied';
    END IF;
END $$;

-- The idempotency tables looked up now: the current bucket's first, then the previous.
CREATE FUNCTION shardd_once_tables(p_window integer) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT ARRAY['~idem:' || p_window || ':' || b, '~idem:' || p_window || ':' || (b - 1)]
    FROM (SELECT floor(extract(epoch FROM now()) / p_window)::bigint AS b) AS bucket
$$;

-- The recorded outcome of one op (NULL: none yet); SD422 when it was recorded for a
-- different request.  Volatile: reads with a snapshot taken after the lock.
CREATE FUNCTION shardd_once_recorded(p_pk text, p_key text, p_hash text, p_window integer)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    rec jsonb;
    other boolean := false;
BEGIN
    FOR rec IN
        SELECT i.doc FROM shardd_items i
        WHERE i.tbl = ANY (shardd_once_tables(p_window)) AND i.pk = p_pk AND i.sk = p_key
    LOOP
        other := other OR rec->>'hash' IS DISTINCT FROM p_hash;
    END LOOP;
    IF other THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD422',
            MESSAGE = 'this Idempotency-Key was used for a different request';
    END IF;
    RETURN rec;
END $$;

-- The claim of a key by a request (its digest), on the owner of the claim's slot, in a
-- transaction of its own before the write: SD422 when another request claimed the key.
CREATE FUNCTION shardd_once_claim(p_slot integer, p_claim text, p_hash text, p_window integer)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM shardd_fence_write(p_slot);
    INSERT INTO shardd_items (tbl, pk, sk, slot, version, doc)
    VALUES ((shardd_once_tables(p_window))[1], p_claim, '', p_slot, 1,
            jsonb_build_object('hash', p_hash))
    ON CONFLICT (tbl, pk, sk) DO NOTHING;
    PERFORM shardd_once_recorded(p_claim, '', p_hash, p_window);
END $$;

-- shardd_write with a key: the recorded outcome when there is one (replayed), else the
-- write and its record, in one transaction.
CREATE PROCEDURE shardd_write_once(
    p_op text, p_slot integer, p_tbl text, p_pk text, p_sk text, p_doc jsonb,
    p_if_version bigint, p_max_bytes integer, p_lock text, p_key text, p_hash text,
    p_window integer, INOUT version bigint DEFAULT NULL, INOUT created boolean DEFAULT NULL,
    INOUT doc jsonb DEFAULT NULL, INOUT lsn pg_lsn DEFAULT NULL,
    INOUT replayed boolean DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    rec jsonb;
BEGIN
    -- On the slot's owner only: a node that gave the slot away may still hold records.
    PERFORM shardd_fence_write(p_slot);
    PERFORM shardd_once_lock(p_lock);
    rec := shardd_once_recorded(p_pk, p_key, p_hash, p_window);
    IF rec IS NOT NULL THEN
        version := (rec->>'version')::bigint;
        created := (rec->>'created')::boolean;
        doc := rec->'doc';
        replayed := true;
        -- A transaction id makes the COMMIT below write a commit record, and so wait for
        -- the synchronous standby like a write: a replay never answers for a write the
        -- standby may not have (one whose own wait was cancelled, answered 504).
        PERFORM pg_current_xact_id();
    ELSE
        IF p_op = 'put' THEN
            SELECT w.version, w.created INTO version, created
            FROM shardd_put(p_slot, p_tbl, p_pk, p_sk, p_doc, p_if_version) w;
        ELSIF p_op = 'patch' THEN
            SELECT w.version, w.doc INTO version, doc
            FROM shardd_patch(p_slot, p_tbl, p_pk, p_sk, p_doc, p_if_version, p_max_bytes) w;
        ELSIF p_op = 'delete' THEN
            version := shardd_delete(p_slot, p_tbl, p_pk, p_sk, p_if_version);
        ELSE
            RAISE EXCEPTION 'unknown write op %', p_op;
        END IF;
        PERFORM shardd_put(p_slot, (shardd_once_tables(p_window))[1], p_pk, p_key,
                           jsonb_build_object('hash', p_hash, 'version', version,
                                              'created', created, 'doc', doc), 0);
        replayed := false;
    END IF;
    COMMIT;
    lsn := pg_current_wal_lsn();
END $$;

-- shardd_write_batch with a key: per op, its recorded outcome or the op and its record
-- (p_keys: each op's record key).  Every op's slot is fenced first, replayed ones too,
-- in the order of the ops (sorted by slot), as shardd_write_batch's writers lock them.
CREATE PROCEDURE shardd_write_batch_once(
    p_tbl text, p_slots integer[], p_pks text[], p_sks text[], p_docs jsonb[],
    p_puts boolean[], p_lock text, p_keys text[], p_hash text, p_window integer,
    INOUT versions bigint[] DEFAULT NULL, INOUT lsn pg_lsn DEFAULT NULL,
    INOUT replayed boolean[] DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
    rec jsonb;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_pks, 1), 0) LOOP
        PERFORM shardd_fence_write(p_slots[i]);
    END LOOP;
    PERFORM shardd_once_lock(p_lock);
    versions := '{}';
    replayed := '{}';
    FOR i IN 1 .. coalesce(array_length(p_pks, 1), 0) LOOP
        rec := shardd_once_recorded(p_pks[i], p_keys[i], p_hash, p_window);
        IF rec IS NOT NULL THEN
            v := (rec->>'version')::bigint;
            replayed := array_append(replayed, true);
            PERFORM pg_current_xact_id();  -- the COMMIT waits for the standby (see above)
        ELSE
            IF p_puts[i] THEN
                SELECT w.version INTO v
                FROM shardd_put(p_slots[i], p_tbl, p_pks[i], p_sks[i], p_docs[i], NULL) w;
            ELSE
                v := shardd_delete(p_slots[i], p_tbl, p_pks[i], p_sks[i], NULL);
            END IF;
            PERFORM shardd_put(p_slots[i], (shardd_once_tables(p_window))[1], p_pks[i], p_keys[i],
                               jsonb_build_object('hash', p_hash, 'version', v), 0);
            replayed := array_append(replayed, false);
        END IF;
        versions := array_append(versions, v);
    END LOOP;
    COMMIT;
    lsn := pg_current_wal_lsn();
END $$;

-- Delete up to p_batch claims and records of one idempotency table whose whole bucket is
-- older than p_retention seconds (none is looked up any more); returns how many, 0 when
-- no such table is left.  The tables are found by a skip scan of the primary key.  Like
-- a deleted table's items, the rows go without the slot's lock: a move racing it may
-- fail its verification and be undone, never lose a row that is still needed.
CREATE FUNCTION shardd_trim_once(p_retention double precision, p_batch integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    n integer;
BEGIN
    FOR t IN
        WITH RECURSIVE tables AS (
            SELECT min(tbl) AS tbl FROM shardd_items WHERE tbl > '~idem:' AND tbl < '~idem;'
            UNION ALL
            SELECT (SELECT min(i.tbl) FROM shardd_items i
                    WHERE i.tbl > tables.tbl AND i.tbl < '~idem;')
            FROM tables WHERE tables.tbl IS NOT NULL)
        SELECT tbl FROM tables WHERE tbl IS NOT NULL
    LOOP
        -- '~idem:<window>:<bucket>': the bucket ends at (bucket + 1) * window.
        IF (split_part(t, ':', 3)::bigint + 1) * split_part(t, ':', 2)::bigint
           <= extract(epoch FROM now()) - p_retention THEN
            DELETE FROM shardd_items WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM shardd_items WHERE tbl = t LIMIT p_batch));
            GET DIAGNOSTICS n = ROW_COUNT;
            RETURN n;
        END IF;
    END LOOP;
    RETURN 0;
END $$;
