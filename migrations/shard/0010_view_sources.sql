-- Views need an item's previous document to remove the row it had under an old view key.
-- Tables with views are listed here (by the view maintainer, under the table's write
-- lock, so every write after the listing commits sees it); for them the change log keeps
-- the replaced or deleted document in "old".  Other tables pay one index probe.
CREATE TABLE shardd_view_sources (
    tbl     text COLLATE "C" PRIMARY KEY
);

ALTER TABLE shardd_changes ADD COLUMN old jsonb;

CREATE OR REPLACE FUNCTION shardd_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    keep_old boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO shardd_changes (op, tbl, pk, sk, slot, version, doc)
        VALUES ('put', NEW.tbl, NEW.pk, NEW.sk, NEW.slot, NEW.version, NEW.doc);
        RETURN NULL;
    END IF;
    keep_old := EXISTS (SELECT 1 FROM shardd_view_sources WHERE tbl = OLD.tbl);
    IF TG_OP = 'DELETE' THEN
        INSERT INTO shardd_changes (op, tbl, pk, sk, slot, version, doc, old)
        VALUES ('delete', OLD.tbl, OLD.pk, OLD.sk, OLD.slot, OLD.version, NULL,
                CASE WHEN keep_old THEN OLD.doc END);
    ELSE
        INSERT INTO shardd_changes (op, tbl, pk, sk, slot, version, doc, old)
        VALUES ('put', NEW.tbl, NEW.pk, NEW.sk, NEW.slot, NEW.version, NEW.doc,
                CASE WHEN keep_old THEN OLD.doc END);
    END IF;
    RETURN NULL;
END $$;

-- List a table as a view source: waits for the table's writes in flight (they hold its
-- lock shared, see shardd_check_table_fence), so every later write keeps old documents.
CREATE FUNCTION shardd_add_view_source(p_tbl text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(shardd_table_lock_class(), hashtext(p_tbl));
    INSERT INTO shardd_view_sources (tbl) VALUES (p_tbl) ON CONFLICT (tbl) DO NOTHING;
END $$;

-- Apply view rows: each a put (doc set) or a delete (doc NULL) of (p_tbl, pk, sk), done
-- only where the stored row was built from an older or the same source version, so a
-- late or repeated apply never replaces a row built from a newer one.  Fenced like every
-- write: the node's and each slot's lock shared, ownership checked, in slot order.
CREATE PROCEDURE shardd_view_apply(
    p_tbl text, p_slots integer[], p_pks text[], p_sks text[], p_docs jsonb[],
    p_versions bigint[], INOUT written integer DEFAULT NULL, INOUT lsn pg_lsn DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    s integer;
    n integer;
BEGIN
    FOR s IN SELECT DISTINCT x FROM unnest(p_slots) AS x ORDER BY x LOOP
        PERFORM shardd_fence_write(s);
    END LOOP;
    DELETE FROM shardd_items AS i
    USING unnest(p_pks, p_sks, p_docs, p_versions) AS d(pk, sk, doc, v)
    WHERE d.doc IS NULL AND i.tbl = p_tbl AND i.pk = d.pk AND i.sk = d.sk
      AND (i.doc -> 'source' ->> 'version')::bigint <= d.v;
    GET DIAGNOSTICS written = ROW_COUNT;
    INSERT INTO shardd_items AS i (tbl, pk, sk, slot, version, doc)
    SELECT p_tbl, d.pk, d.sk, d.slot, 1, d.doc
    FROM unnest(p_slots, p_pks, p_sks, p_docs) AS d(slot, pk, sk, doc)
    WHERE d.doc IS NOT NULL
    ON CONFLICT (tbl, pk, sk) DO UPDATE
        SET version = i.version + 1, doc = excluded.doc, updated_at = now()
        WHERE (i.doc -> 'source' ->> 'version')::bigint
              <= (excluded.doc -> 'source' ->> 'version')::bigint
          AND i.doc IS DISTINCT FROM excluded.doc;
    GET DIAGNOSTICS n = ROW_COUNT;
    written := written + n;
    COMMIT;
    lsn := pg_current_wal_lsn();
END $$;
