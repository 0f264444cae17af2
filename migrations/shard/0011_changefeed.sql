-- The change feed (shardd/changefeed.py): how far the change log has been trimmed.
--
-- A feed cursor holds a snapshot position per shard.  It has lost entries exactly when
-- an entry it had not passed was deleted: the feed compares its position with the
-- highest transaction id any deletion from the log removed, recorded here by a
-- statement trigger in the same transaction as the deletion (whoever deletes), so a
-- cursor older than what is kept gets 410 cursor_expired instead of a silent gap.
CREATE TABLE shardd_changes_horizon (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    trimmed_to  xid8 NOT NULL,  -- the highest txid of an entry deleted from the log
    trimmed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION shardd_note_trim() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO shardd_changes_horizon AS h (trimmed_to)
    SELECT max(txid) FROM gone HAVING count(*) > 0
    ON CONFLICT (one) DO UPDATE
        SET trimmed_to = greatest(h.trimmed_to, excluded.trimmed_to), trimmed_at = now();
    RETURN NULL;
END $$;

CREATE TRIGGER shardd_changes_trimmed AFTER DELETE ON shardd_changes
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION shardd_note_trim();
