-- A batch write's puts and deletes for one shard, committed inside the call, as
-- shardd_write commits a single write: the commit is part of the one statement, so the
-- session's statement_timeout bounds the whole batch, commit included.  A batch
-- therefore never commits after its writer's deadline and topology lease (a separate
-- COMMIT could arrive later than statement_timeout after the batch was sent).
--
-- The keys come sorted by (slot, pk, sk) and are written in that order: every batch
-- takes its slot locks (shared) in ascending slot order, as a freeze takes them
-- (exclusive), and its row locks in key order, as every other batch does.  A key given
-- twice is written twice, in the order given.  versions holds, in the same order, each
-- put's new version and each delete's deleted version (NULL: it was absent); lsn is the
-- WAL position after the commit.
CREATE PROCEDURE shardd_write_batch(
    p_tbl text, p_slots integer[], p_pks text[], p_sks text[], p_docs jsonb[],
    p_puts boolean[], INOUT versions bigint[] DEFAULT NULL, INOUT lsn pg_lsn DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    versions := '{}';
    FOR i IN 1 .. coalesce(array_length(p_pks, 1), 0) LOOP
        IF p_puts[i] THEN
            SELECT w.version INTO v
            FROM shardd_put(p_slots[i], p_tbl, p_pks[i], p_sks[i], p_docs[i], NULL) w;
        ELSE
            v := shardd_delete(p_slots[i], p_tbl, p_pks[i], p_sks[i], NULL);
        END IF;
        versions := array_append(versions, v);
    END LOOP;
    COMMIT;
    lsn := pg_current_wal_lsn();
END $$;
