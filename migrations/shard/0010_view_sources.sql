-- Views need an item's previous document to remove the row it had under an old view key.
-- Tables with views are listed here (by the view maintainer, which then copies a view
-- only once every transaction older than the listing has ended); for them the change
-- log keeps the replaced or deleted document in "old".  Other tables pay one index
-- probe.
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

-- Apply view rows: each a put (doc set) or a removal (doc NULL) of (p_tbl, pk, sk), done
-- only where the stored row was built from an older or the same source version, so a
-- late or repeated apply never replaces a row built from a newer one.  Fenced like every
-- write: the node's and each slot's lock shared, ownership checked, in slot order.
--
-- View rows are applied under a view-maintenance lease (shardd/views/keeper.py).  An
-- apply carries the lease's expiry (the catalog's clock) and is refused (SQLSTATE
-- SD020) once it has passed: a maintainer stopped past its lease (paused, partitioned)
-- cannot land a stale apply after another one took the source shard over.  Repairs and
-- other callers pass NULL.
--
-- A row may also be forced: written (or removed) whatever source version the stored row
-- was built from.  Item versions start again at 1 when an item is deleted and created
-- anew, so the row of a re-created item must replace the one of its earlier life.
CREATE PROCEDURE shardd_view_apply(
    p_tbl text, p_slots integer[], p_pks text[], p_sks text[], p_docs jsonb[],
    p_versions bigint[], p_force boolean[], p_not_after timestamptz,
    INOUT written integer DEFAULT NULL, INOUT lsn pg_lsn DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    s integer;
    n integer;
BEGIN
    FOR s IN SELECT DISTINCT x FROM unnest(p_slots) AS x ORDER BY x LOOP
        PERFORM shardd_fence_write(s);
    END LOOP;
    -- After the locks: a lease that ran out while this apply waited for them counts.
    IF p_not_after IS NOT NULL AND clock_timestamp() > p_not_after THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD020',
            MESSAGE = 'the view-maintenance lease of this apply has expired';
    END IF;
    DELETE FROM shardd_items AS i
    USING unnest(p_pks, p_sks, p_docs, p_versions, p_force) AS d(pk, sk, doc, v, force)
    WHERE d.doc IS NULL AND i.tbl = p_tbl AND i.pk = d.pk AND i.sk = d.sk
      AND (d.force OR (i.doc -> 'source' ->> 'version')::bigint <= d.v);
    GET DIAGNOSTICS written = ROW_COUNT;
    INSERT INTO shardd_items AS i (tbl, pk, sk, slot, version, doc)
    SELECT p_tbl, d.pk, d.sk, d.slot, 1, d.doc
    FROM unnest(p_slots, p_pks, p_sks, p_docs, p_force) AS d(slot, pk, sk, doc, force)
    WHERE d.doc IS NOT NULL AND NOT d.force
    ON CONFLICT (tbl, pk, sk) DO UPDATE
        SET version = i.version + 1, doc = excluded.doc, updated_at = now()
        WHERE (i.doc -> 'source' ->> 'version')::bigint
              <= (excluded.doc -> 'source' ->> 'version')::bigint
          AND i.doc IS DISTINCT FROM excluded.doc;
    GET DIAGNOSTICS n = ROW_COUNT;
    written := written + n;
    INSERT INTO shardd_items AS i (tbl, pk, sk, slot, version, doc)
    SELECT p_tbl, d.pk, d.sk, d.slot, 1, d.doc
    FROM unnest(p_slots, p_pks, p_sks, p_docs, p_force) AS d(slot, pk, sk, doc, force)
    WHERE d.doc IS NOT NULL AND d.force
    ON CONFLICT (tbl, pk, sk) DO UPDATE
        SET version = i.version + 1, doc = excluded.doc, updated_at = now()
        WHERE i.doc IS DISTINCT FROM excluded.doc;
    GET DIAGNOSTICS n = ROW_COUNT;
    written := written + n;
    COMMIT;
    lsn := pg_current_wal_lsn();
END $$;
