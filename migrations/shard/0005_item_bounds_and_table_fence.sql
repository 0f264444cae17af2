-- Item size on PATCH, and the fence that keeps a table being deleted free of new rows.

-- PATCH checks the merged document's size in the same statement that writes it: a
-- result over p_max_bytes (JSON text, as reads return it) that is larger than the item
-- was is refused with SQLSTATE SD413 and nothing is written.  An item that is already
-- over the limit may still shrink or stay the same size.
DROP PROCEDURE shardd_write(text, integer, text, text, text, jsonb, bigint, bigint, boolean,
                            jsonb, pg_lsn);
DROP FUNCTION shardd_patch(integer, text, text, text, jsonb, bigint);

CREATE FUNCTION shardd_patch(
    p_slot integer, p_tbl text, p_pk text, p_sk text, p_patch jsonb, p_if_version bigint,
    p_max_bytes integer, OUT version bigint, OUT doc jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
    old jsonb;
    merged jsonb;
BEGIN
    PERFORM shardd_fence_write(p_slot);
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

CREATE PROCEDURE shardd_write(
    p_op text, p_slot integer, p_tbl text, p_pk text, p_sk text, p_doc jsonb,
    p_if_version bigint, p_max_bytes integer,
    INOUT version bigint DEFAULT NULL, INOUT created boolean DEFAULT NULL,
    INOUT doc jsonb DEFAULT NULL, INOUT lsn pg_lsn DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
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
    COMMIT;
    lsn := pg_current_wal_lsn();
END $$;

-- Tables being deleted (or deleted recently).  While a table has a row here, no write
-- may create or change one of its items: a router that still believes the table is
-- live is refused with SQLSTATE SD410.  The row stays after the deletion completes and
-- is removed only when the name is declared again, once it is old enough that no
-- router can still hold a topology from before the deletion (see shardd/tables.py).
CREATE TABLE shardd_table_fences (
    tbl         text COLLATE "C" PRIMARY KEY,
    since       timestamptz NOT NULL DEFAULT now()
);

-- Advisory-lock class for tables: every item write holds hashtext(table) shared until
-- it commits; fencing a table takes it exclusively, so the fence commits after every
-- write in flight and every later write sees it.  (Two names with the same hash only
-- make a fence wait a little longer.)
CREATE FUNCTION shardd_table_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 1936221288 $$;

-- Volatile plpgsql: the fence lookup takes a new snapshot after the lock is granted.
CREATE FUNCTION shardd_check_table_fence() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(shardd_table_lock_class(), hashtext(NEW.tbl));
    IF EXISTS (SELECT 1 FROM shardd_table_fences WHERE tbl = NEW.tbl) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD410',
            MESSAGE = format('table %s is being deleted', NEW.tbl);
    END IF;
    RETURN NEW;
END $$;

-- Slot moves copy and apply rows with shardd.copying on: they carry the source's state
-- (including its deletions) and are not new writes.
CREATE TRIGGER shardd_items_table_fence BEFORE INSERT OR UPDATE ON shardd_items
    FOR EACH ROW WHEN (current_setting('shardd.copying', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION shardd_check_table_fence();

CREATE FUNCTION shardd_fence_table(p_tbl text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(shardd_table_lock_class(), hashtext(p_tbl));
    INSERT INTO shardd_table_fences (tbl) VALUES (p_tbl) ON CONFLICT (tbl) DO NOTHING;
END $$;

-- Delete up to p_batch items of a table; returns how many.
CREATE FUNCTION shardd_delete_table_items(p_tbl text, p_batch integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM shardd_items WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM shardd_items WHERE tbl = p_tbl LIMIT p_batch));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Lift a table's fence once it is p_min_age seconds old.  Returns the seconds still to
-- wait (0: no fence remains).
CREATE FUNCTION shardd_unfence_table(p_tbl text, p_min_age double precision)
RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    age double precision;
BEGIN
    SELECT extract(epoch FROM now() - since) INTO age
    FROM shardd_table_fences WHERE tbl = p_tbl;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF age < p_min_age THEN
        RETURN p_min_age - age;
    END IF;
    DELETE FROM shardd_table_fences WHERE tbl = p_tbl;
    RETURN 0;
END $$;
