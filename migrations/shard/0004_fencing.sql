-- Fencing in one set of functions (see shardd/fencing.py): every change of a slot's
-- state and every control-plane effect on a shard goes through these, and each checks,
-- in its own transaction, that it runs on a writable, unfenced primary.

-- Raise SD002 unless this node is a primary that has not been fenced.  Takes the node
-- lock shared, like every write: a switchover (which takes it exclusively, sets
-- fenced and commits) waits for the caller's transaction, and every later call sees
-- the fence.  A node in recovery is refused too: a move or a write must never act on
-- a replica, whatever an out-of-date caller believes.
CREATE FUNCTION shardd_assert_primary() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(shardd_slot_lock_class(), -1);
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD002',
            MESSAGE = 'this node is in recovery: it is not the primary of its shard';
    END IF;
    IF (SELECT fenced FROM shardd_node_state) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'SD002',
            MESSAGE = 'this node is fenced: it is no longer the primary of its shard';
    END IF;
END $$;

-- Set the state of slots, on the primary only.  p_from limits the change to slots
-- currently in one of those states (NULL: any state); slots without a row get one
-- unless p_from is given.  Returns the number of slots changed.
CREATE FUNCTION shardd_set_slot_state(p_slots integer[], p_state text, p_from text[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM shardd_assert_primary();
    IF p_from IS NULL THEN
        INSERT INTO shardd_slots (slot, state) SELECT unnest(p_slots), p_state
        ON CONFLICT (slot) DO UPDATE SET state = excluded.state, changed_at = now()
        WHERE shardd_slots.state IS DISTINCT FROM excluded.state;
    ELSE
        UPDATE shardd_slots SET state = p_state, changed_at = now()
        WHERE slot = ANY(p_slots) AND state = ANY(p_from) AND state <> p_state;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Drop the slots' rows altogether (a move's target giving up its partial copy).
CREATE FUNCTION shardd_forget_slots(p_slots integer[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM shardd_assert_primary();
    DELETE FROM shardd_slots WHERE slot = ANY(p_slots);
END $$;

-- Freeze owned slots: take each slot's lock exclusively, in ascending slot order (as
-- batch writes take them shared), which waits exactly for the writes in flight; every
-- later write sees 'frozen' and is refused.  The caller bounds the wait with
-- lock_timeout and retries.
CREATE FUNCTION shardd_freeze_slots(p_slots integer[]) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM shardd_assert_primary();
    PERFORM pg_advisory_xact_lock(shardd_slot_lock_class(), s)
    FROM unnest(p_slots) AS s ORDER BY s;
    RETURN shardd_set_slot_state(p_slots, 'frozen', ARRAY['owned']);
END $$;
