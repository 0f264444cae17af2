-- Lighter item writes, the same checks.

-- Most writes to an item store replace an item.  Free space on every page lets
-- Postgres write the new version of a row next to the old one without a new entry in
-- each index (a HOT update: none of the indexed columns, tbl, pk, sk and slot, changes).
ALTER TABLE shardd_items SET (fillfactor = 80);

-- The write fence with one look at both states instead of two.  Safety is unchanged:
-- the node's lock (-1) and then the slot's are taken shared first, in the order every
-- writer takes them; a freeze of the slot, and a node fence that waits for the writes in
-- flight, take the lock exclusively, change the state and commit; and this statement's
-- snapshot is taken after both locks were granted, so it sees every fence and every
-- freeze that committed before this write could go on.  Without its one row of node
-- state the node counts as fenced (fail closed).
CREATE OR REPLACE FUNCTION shardd_fence_write(p_slot integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    is_fenced boolean;
    st text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), -1);
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), p_slot);
    SELECT n.fenced, s.state INTO is_fenced, st
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
END $$;
