-- Table deletion in steps: the row is marked 'deleting' first (instances then refuse
-- the table's reads and writes), the items go from every shard, and the row goes last.
-- A deletion that stopped half-way (a shard down, a crash) resumes on the next DELETE.
ALTER TABLE shardd_tables ADD COLUMN state text NOT NULL DEFAULT 'active'
    CHECK (state IN ('active', 'deleting'));

-- Names whose deletion completed: shards keep refusing writes to them (a fence) until
-- the name is declared again; the declaration lifts the fences first (shardd/tables.py).
CREATE TABLE shardd_dropped_tables (
    name        text PRIMARY KEY,
    dropped_at  timestamptz NOT NULL DEFAULT now()
);
