-- Idempotency keys: a write that carries one records its outcome in the same transaction,
-- so a retry with the same key (after a lost response) returns that outcome and changes
-- nothing.
--
-- A record is an item of the internal table "~idem" with the written item's pk, so it
-- lives in the item's slot: it is written in the item's transaction, replicated with it,
-- moved with the slot, and survives a failover exactly as the item does.  (A claim of
-- the key, pk "<caller>:<key>", detects the key's reuse for another request.)  Its sk is
-- "<caller>:<op index>:<key>" (the caller: a digest of the bearer token; the index: the
-- op's place in its request, 0 for a single write).  Its document holds the request's
-- digest and the outcome: {"hash", "version", "created", "doc"}.
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

-- The recorded outcome of one op (NULL: none yet); SD422 when it was recorded for a
-- different request.  Volatile: reads with a snapshot taken after the lock.
CREATE FUNCTION shardd_once_recorded(p_pk text, p_key text, p_hash text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    rec jsonb;
BEGIN
    SELECT i.doc INTO rec FROM shardd_items i
    WHERE i.tbl = '~idem' AND i.pk = p_pk AND i.sk = p_key;
    IF rec IS NOT NULL AND rec->>'hash' IS DISTINCT FROM p_hash THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD422',
            MESSAGE = 'this Idempotency-Key was used for a different request';
    END IF;
    RETURN rec;
END $$;

-- The claim of a key by a request (its digest), on the owner of the claim's slot, in a
-- transaction of its own before the write: SD422 when another request claimed the key.
CREATE FUNCTION shardd_once_claim(p_slot integer, p_claim text, p_hash text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM shardd_fence_write(p_slot);
    INSERT INTO shardd_items (tbl, pk, sk, slot, version, doc)
    VALUES ('~idem', p_claim, '', p_slot, 1, jsonb_build_object('hash', p_hash))
    ON CONFLICT (tbl, pk, sk) DO NOTHING;
    PERFORM shardd_once_recorded(p_claim, '', p_hash);
END $$;

-- shardd_write with a key: the recorded outcome when there is one (replayed), else the
-- write and its record, in one transaction.
CREATE PROCEDURE shardd_write_once(
    p_op text, p_slot integer, p_tbl text, p_pk text, p_sk text, p_doc jsonb,
    p_if_version bigint, p_max_bytes integer, p_lock text, p_key text, p_hash text,
    INOUT version bigint DEFAULT NULL, INOUT created boolean DEFAULT NULL,
    INOUT doc jsonb DEFAULT NULL, INOUT lsn pg_lsn DEFAULT NULL,
    INOUT replayed boolean DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    rec jsonb;
BEGIN
    -- On the slot's owner only: a node that gave the slot away may still hold records.
    PERFORM shardd_fence_write(p_slot);
    PERFORM shardd_once_lock(p_lock);
    rec := shardd_once_recorded(p_pk, p_key, p_hash);
    IF rec IS NOT NULL THEN
        version := (rec->>'version')::bigint;
        created := (rec->>'created')::boolean;
        doc := rec->'doc';
        replayed := true;
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
        PERFORM shardd_put(p_slot, '~idem', p_pk, p_key,
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
    p_puts boolean[], p_lock text, p_keys text[], p_hash text,
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
        rec := shardd_once_recorded(p_pks[i], p_keys[i], p_hash);
        IF rec IS NOT NULL THEN
            v := (rec->>'version')::bigint;
            replayed := array_append(replayed, true);
        ELSE
            IF p_puts[i] THEN
                SELECT w.version INTO v
                FROM shardd_put(p_slots[i], p_tbl, p_pks[i], p_sks[i], p_docs[i], NULL) w;
            ELSE
                v := shardd_delete(p_slots[i], p_tbl, p_pks[i], p_sks[i], NULL);
            END IF;
            PERFORM shardd_put(p_slots[i], '~idem', p_pks[i], p_keys[i],
                               jsonb_build_object('hash', p_hash, 'version', v), 0);
            replayed := array_append(replayed, false);
        END IF;
        versions := array_append(versions, v);
    END LOOP;
    COMMIT;
    lsn := pg_current_wal_lsn();
END $$;

-- Drop records older than p_before, at most p_batch, of the slots this node owns (a
-- moved slot's records go with it; its owner trims them).  Returns how many.
CREATE FUNCTION shardd_trim_once(p_before timestamptz, p_batch integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM shardd_items AS i
    WHERE (i.tbl, i.pk, i.sk) IN (
        SELECT r.tbl, r.pk, r.sk FROM shardd_items r
        JOIN shardd_slots s ON s.slot = r.slot AND s.state = 'owned'
        WHERE r.tbl = '~idem' AND r.updated_at < p_before
        LIMIT p_batch);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;
