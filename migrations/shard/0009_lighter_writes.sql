-- Lighter item writes, the same checks.

-- Most writes to an item store replace an item.  Free space on every page lets
-- Postgres write the new version of a row next to the old one without a new entry in
-- each index (a HOT update: none of the indexed columns, tbl, pk, sk and slot, changes).
ALTER TABLE shardd_items SET (fillfactor = 80);

-- The write fence with one look at both states instead of two.  Safety is unchanged:
-- the node's lock (-1) and then the slot's are taken shared first, in the order every
-- writer takes them; a fence of the node or a freeze of the slot takes its lock
-- exclusively, changes the state and commits; and this statement's snapshot is taken
-- after both locks were granted, so it sees every fence and every freeze that
-- committed before this write could go on.
CREATE OR REPLACE FUNCTION shardd_fence_write(p_slot integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    is_fenced boolean;
    st text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), -1);
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), p_slot);
    SELECT n.fenced, s.state INTO is_fenced, st
    FROM shardd_node_state n LEFT JOIN shardd_slots s ON s.slot = p_slot;
    IF is_fenced THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD002',
            MESSAGE = 'this node is fenced: it is no longer the primary of its shard';
    END IF;
    IF st IS DISTINCT FROM 'owned' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD001',
            MESSAGE = format('slot %s is %s on this shard', p_slot, coalesce(st, 'not owned'));
    END IF;
END $$;
