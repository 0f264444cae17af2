-- Failover: the replication mode, live instances, the monitor lease and a history.

-- true when shards replicate synchronously (synchronous_standby_names = 'ANY 1 (*)');
-- a promoted primary gets the same setting as soon as it has a standby again.
ALTER TABLE shardd_cluster ADD COLUMN synchronous boolean NOT NULL DEFAULT false;

-- Every running shardd instance reports the epoch it routes with.  Leader work waits
-- for all of them (or for the topology lease to run out) before acting on a fence.
CREATE TABLE shardd_instances (
    id          text PRIMARY KEY,
    address     text NOT NULL,
    epoch       bigint NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);

-- Who holds a leader lease (informative: the lease itself is an advisory lock).
CREATE TABLE shardd_leases (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shardd_failovers (
    id            bigserial PRIMARY KEY,
    shard         text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('automatic', 'planned')),
    old_primary   text NOT NULL,
    new_primary   text NOT NULL,
    -- WAL the new primary had not received when promoted (0 in synchronous mode or a
    -- planned switchover; NULL when the old primary's position was unknown).
    lost_bytes    bigint,
    detected_at   timestamptz NOT NULL,
    promoted_at   timestamptz NOT NULL DEFAULT now()
);
