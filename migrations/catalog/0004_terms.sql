-- Terms, write blocks and synchronous modes.
--
-- A shard's term grows by one with every promotion recorded for it.  A move records
-- the terms of its source and target when it starts, and compares them before every
-- step: a different term means the primary changed under the move (see
-- shardd/reshard/mover.py).
ALTER TABLE shardd_shards ADD COLUMN term bigint NOT NULL DEFAULT 0;

-- Why writes to a shard are refused at once, or NULL: 'no_failover_candidate' (its
-- primary is down and no replica qualifies for automatic promotion) or
-- 'no_sync_standby' (strict synchronous mode without a healthy standby).
ALTER TABLE shardd_shards ADD COLUMN write_block text;
-- The shard runs asynchronously although the cluster is synchronous (degrade mode).
ALTER TABLE shardd_shards ADD COLUMN degraded boolean NOT NULL DEFAULT false;

-- 'degrade' drops a shard to asynchronous commit while it has no healthy standby;
-- 'strict' refuses its writes instead (Patroni's synchronous_mode_strict).
ALTER TABLE shardd_cluster ADD COLUMN synchronous_mode text NOT NULL DEFAULT 'degrade'
    CHECK (synchronous_mode IN ('degrade', 'strict'));

ALTER TABLE shardd_moves ADD COLUMN source_term bigint;
ALTER TABLE shardd_moves ADD COLUMN target_term bigint;

-- A promotion's loss: lost_bytes is at least this much when lost_exact is false (the
-- old primary's end of WAL was not known); exact once the old primary was read again.
ALTER TABLE shardd_failovers ADD COLUMN lost_exact boolean NOT NULL DEFAULT true;
ALTER TABLE shardd_failovers ADD COLUMN promoted_lsn pg_lsn;
ALTER TABLE shardd_failovers DROP CONSTRAINT shardd_failovers_kind_check;
ALTER TABLE shardd_failovers ADD CONSTRAINT shardd_failovers_kind_check
    CHECK (kind IN ('automatic', 'planned', 'forced'));
