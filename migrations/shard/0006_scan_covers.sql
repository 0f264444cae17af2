-- Scans across a cutover, at any consistency.  The caller names the slots its topology
-- gives this shard; the page holds rows of those slots only, and says whether this node
-- answers for every one of them (owned or frozen here).  A replica that has not yet
-- replayed a cutover does not cover the slots, so the caller reads that shard's page
-- elsewhere (finally on the primary); a primary that does not cover them means the
-- caller's topology is out of date.  Every slot is therefore read on exactly the shard
-- the topology names, from a node that answers for it: nothing skipped, nothing twice.
CREATE FUNCTION shardd_scan_slots(
    p_tbl text, p_after_pk text, p_after_sk text, p_limit integer, p_min_lsn pg_lsn,
    p_slots integer[])
RETURNS TABLE (caught_up boolean, covers boolean, in_recovery boolean,
               pk text, sk text, version bigint, doc jsonb)
LANGUAGE sql STABLE AS $$
    SELECT shardd_caught_up(p_min_lsn),
           NOT EXISTS (SELECT 1 FROM unnest(p_slots) AS want(slot)
                       LEFT JOIN shardd_slots s ON s.slot = want.slot
                       WHERE s.state IS NULL OR s.state NOT IN ('owned', 'frozen')),
           pg_is_in_recovery(),
           i.pk, i.sk, i.version, i.doc
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT it.pk, it.sk, it.version, it.doc FROM shardd_items it
        WHERE it.tbl = p_tbl AND it.slot = ANY(p_slots)
          AND (p_after_pk IS NULL OR (it.pk, it.sk) > (p_after_pk, p_after_sk))
        ORDER BY it.pk, it.sk
        LIMIT p_limit
    ) i ON true
$$;
