-- The catalog: cluster-wide state of one shardd deployment.
-- Every change that instances must see bumps cluster.epoch and notifies
-- channel shardd_topology (see shardd/catalog.py).

CREATE TABLE shardd_cluster (
    id          integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    slot_count  integer NOT NULL CHECK (slot_count > 0),
    epoch       bigint  NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shardd_shards (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,30}$'),
    weight      integer NOT NULL DEFAULT 1 CHECK (weight >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shardd_nodes (
    name        text PRIMARY KEY,
    shard       text NOT NULL REFERENCES shardd_shards (name) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('primary', 'replica')),
    host        text NOT NULL,
    port        integer NOT NULL,
    dbname      text NOT NULL,
    username    text NOT NULL,
    password    text,
    fenced      boolean NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX shardd_nodes_one_primary ON shardd_nodes (shard)
    WHERE role = 'primary' AND NOT fenced;

-- The live slot map: which shard owns each slot.  Shards keep their own copy of the
-- slots they own (shardd_slots on the shard), which is what fences writes.
CREATE TABLE shardd_slot_map (
    slot        integer PRIMARY KEY,
    shard       text NOT NULL REFERENCES shardd_shards (name)
);

-- Operator pins: the target map keeps these slots on these shards.
CREATE TABLE shardd_slot_overrides (
    slot        integer PRIMARY KEY,
    shard       text NOT NULL REFERENCES shardd_shards (name) ON DELETE CASCADE
);

CREATE TABLE shardd_tables (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
