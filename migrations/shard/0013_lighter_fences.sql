-- Lighter writes: the table fence checked together with the node's and the slot's.
--
-- Every insert or update of an item passes the table fence (shardd_check_table_fence, a
-- row trigger, 0005).  The writers that know their table, shardd_put and shardd_patch
-- (and through them every item write, batch and idempotent ones included), now take
-- the table's lock with the node's and the slot's, in the same order as before (node,
-- slot, table), and read the three states in one statement.  They then say so in the
-- transaction-local setting shardd.table_checked, and the trigger's WHEN clause skips
-- the row without calling its function.  Safety is unchanged: the table's lock is held
-- shared until the transaction ends, so a fence of the table (which takes it
-- exclusively) commits either before the check, which sees it, or after this
-- transaction.  Any other writer (view applies, shardd_view_apply) is checked by the
-- trigger as before.

CREATE FUNCTION shardd_fence_write(p_slot integer, p_tbl text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    is_fenced boolean;
    st text;
    tbl_fenced boolean;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), -1);
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), p_slot);
    PERFORM pg_advisory_xact_lock_shared(shardd_table_lock_class(), hashtext(p_tbl));
    SELECT n.fenced, s.state, EXISTS (SELECT 1 FROM shardd_table_fences f WHERE f.tbl = p_tbl)
    INTO is_fenced, st, tbl_fenced
    FROM (SELECT 1) AS one
    LEFT JOIN shardd_node_state n ON true
    LEFT JOIN shardd_slots s ON s.slot = p_slot;
    IF is_fenced IS NOT FALSE THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD002',
            MESSAGE = 'this node is fenced: it is no longer the primary of its shard';
    END IF;
    IF st IS DISTINCT FROM 'owned' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD001',
            MESSAGE = format('slot %s is %s on this shard', p_slot, coalesce(st, 'not owned'));
    END IF;
    IF tbl_fenced THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD410',
            MESSAGE = format('table %s is being deleted', p_tbl);
    END IF;
    PERFORM set_config('shardd.table_checked', p_tbl, true);
END $$;

CREATE OR REPLACE TRIGGER shardd_items_table_fence BEFORE INSERT OR UPDATE ON shardd_items
    FOR EACH ROW WHEN (current_setting('shardd.copying', true) IS DISTINCT FROM 'on'
                       AND current_setting('shardd.table_checked', true) IS DISTINCT FROM NEW.tbl)
    EXECUTE FUNCTION shardd_check_table_fence();

CREATE OR REPLACE FUNCTION shardd_put(
    p_slot integer, p_tbl text, p_pk text, p_sk text, p_doc jsonb, p_if_version bigint,
    OUT version bigint, OUT created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
BEGIN
    PERFORM shardd_fence_write(p_slot, p_tbl);
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


CREATE OR REPLACE FUNCTION shardd_patch(
    p_slot integer, p_tbl text, p_pk text, p_sk text, p_patch jsonb, p_if_version bigint,
    p_max_bytes integer, OUT version bigint, OUT doc jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
    old jsonb;
    merged jsonb;
BEGIN
    PERFORM shardd_fence_write(p_slot, p_tbl);
    SELECT i.version, i.doc INTO cur, old FROM shardd_items i
    WHERE i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk
    FOR UPDATE;
    IF NOT FOUND OR (p_if_version IS NOT NULL AND cur <> p_if_version) THEN
        IF p_if_version IS NOT NULL THEN
            PERFORM shardd_precondition_failed(p_if_version, cur);
        END IF;
        RETURN;  -- absent: NULLs
    END IF;
    merged := shardd_merge_patch(old, p_patch);
    IF octet_length(merged::text) > p_max_bytes
       AND octet_length(merged::text) > octet_length(old::text) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD413',
            MESSAGE = format('the patched item would be %s bytes; items are limited to %s',
                             octet_length(merged::text), p_max_bytes);
    END IF;
    UPDATE shardd_items AS i
    SET version = cur + 1, doc = merged, updated_at = now()
    WHERE i.tbl = p_tbl AND i.pk = p_pk AND i.sk = p_sk
    RETURNING i.version, i.doc INTO version, doc;
END $$;

