-- The change log: one row per item change, written by trigger in the same transaction
-- as the change.  It is the catch-up source of slot moves (and the spine of views,
-- cache invalidation and CDC).
--
-- Consumers never read "everything after sequence N": a transaction can take sequence
-- 50, stay open, and commit after 51 was read.  Each entry keeps its transaction id
-- instead, and a consumer's position is a snapshot (PgQ's scheme): the next batch is the
-- entries visible in a new snapshot but not in the previous one.  See shardd/changelog.py.
CREATE TABLE shardd_changes (
    seq         bigserial PRIMARY KEY,
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    op          text NOT NULL CHECK (op IN ('put', 'delete')),
    tbl         text COLLATE "C" NOT NULL,
    pk          text COLLATE "C" NOT NULL,
    sk          text COLLATE "C" NOT NULL,
    slot        integer NOT NULL,
    version     bigint NOT NULL,
    doc         jsonb,  -- the new document; NULL for a delete
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX shardd_changes_txid ON shardd_changes (txid);

-- Rows copied in by a slot move are not changes: the mover sets shardd.copying, and the
-- trigger's WHEN clause skips them without calling the function (cheap per row).
CREATE FUNCTION shardd_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO shardd_changes (op, tbl, pk, sk, slot, version, doc)
        VALUES ('delete', OLD.tbl, OLD.pk, OLD.sk, OLD.slot, OLD.version, NULL);
    ELSE
        INSERT INTO shardd_changes (op, tbl, pk, sk, slot, version, doc)
        VALUES ('put', NEW.tbl, NEW.pk, NEW.sk, NEW.slot, NEW.version, NEW.doc);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER shardd_items_changes AFTER INSERT OR UPDATE OR DELETE ON shardd_items
    FOR EACH ROW WHEN (current_setting('shardd.copying', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION shardd_log_change();

-- Registered consumers and their positions; entries are trimmed only once every
-- consumer has passed them.
CREATE TABLE shardd_consumers (
    name        text PRIMARY KEY,
    position    pg_snapshot NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
