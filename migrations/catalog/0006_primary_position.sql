-- The last WAL position the monitor saw each shard's primary at (and when).  A forced
-- promotion run from shardctl, which has no health history of its own, measures the
-- loss it reports against it; a promotion clears it.
ALTER TABLE shardd_shards ADD COLUMN primary_lsn pg_lsn;
ALTER TABLE shardd_shards ADD COLUMN primary_lsn_at timestamptz;
