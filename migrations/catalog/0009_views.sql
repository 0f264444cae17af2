-- Views (shardd/views): denormalized copies of a table, re-partitioned by another key,
-- kept current from every source shard's change log.
CREATE TABLE shardd_views (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    source      text NOT NULL REFERENCES shardd_tables (name),
    definition  jsonb NOT NULL,
    description text NOT NULL DEFAULT '',
    -- backfilling: some source shard has not been copied yet (or is copied again);
    -- active: every source shard is followed; deleting: rows are being removed.
    state       text NOT NULL DEFAULT 'backfilling'
                CHECK (state IN ('backfilling', 'active', 'deleting')),
    -- Each declaration gets a generation of its own, which names the item table of its
    -- rows (~v:<name>:<generation>): rows an old maintainer writes late for a view that
    -- was deleted and declared again land in the old table, never in the new one.
    generation  bigserial,
    -- The slots the view's copies have read (each copy reads the slots its shard
    -- answers for then).  The view turns active only once they are every slot: a copy
    -- on a move's target before the flip and one on its source after it both leave the
    -- moved slots out, and the shard that owns them now copies them again.
    covered     integer[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- How far each view has applied each source shard's change log: a snapshot of that
-- shard (PgQ position), which primary it was taken on (system identifier and
-- timeline: a position from another history is not trusted), when it was taken, and
-- how many changes the last batch held.  No row: the shard is to be backfilled.
CREATE TABLE shardd_view_positions (
    view        text NOT NULL REFERENCES shardd_views (name) ON DELETE CASCADE,
    shard       text NOT NULL,
    position    text NOT NULL,
    origin      text NOT NULL,
    -- While the shard's log is read again after a promotion: the position it had on the
    -- old history.  Changes of slots the shard no longer answers for that it had seen
    -- were applied then (their keys moved on elsewhere) and are not applied again.
    replaced    text,
    taken_at    timestamptz NOT NULL,
    last_batch  integer NOT NULL DEFAULT 0,
    applied     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (view, shard)
);

-- Which instance maintains the views of a source shard, until when.  A holder renews
-- long before expiry; another instance takes a lapsed lease.
CREATE TABLE shardd_view_leases (
    shard       text PRIMARY KEY,
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- Instances that take part in view maintenance, with when each was last seen: the
-- source shards are shared out among the ones seen within a lease.
CREATE TABLE shardd_view_keepers (
    instance    text PRIMARY KEY,
    seen_at     timestamptz NOT NULL DEFAULT now()
);
