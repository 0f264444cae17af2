-- Node fencing: a primary that has been replaced (or is being switched over) refuses
-- every write, whoever routes it.  The check sits in shardd_fence_write, so it runs in
-- the same transaction as every write.
--
-- Key -1 of the slot-lock class stands for the whole node: writes hold it shared; a
-- switchover takes it exclusively to wait for the writes in flight, sets fenced and
-- commits, and every later write sees fenced (READ COMMITTED: each statement takes a
-- new snapshot after its lock was granted).  SQLSTATE SD002 tells shardd to refresh its
-- topology and retry on the shard's new primary.
CREATE TABLE shardd_node_state (
    id          integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    fenced      boolean NOT NULL DEFAULT false,
    reason      text,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO shardd_node_state DEFAULT VALUES;

CREATE OR REPLACE FUNCTION shardd_fence_write(p_slot integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), -1);
    IF (SELECT fenced FROM shardd_node_state) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD002',
            MESSAGE = 'this node is fenced: it is no longer the primary of its shard';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), p_slot);
    SELECT state INTO st FROM shardd_slots WHERE slot = p_slot;
    IF st IS DISTINCT FROM 'owned' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD001',
            MESSAGE = format('slot %s is %s on this shard', p_slot, coalesce(st, 'not owned'));
    END IF;
END $$;
