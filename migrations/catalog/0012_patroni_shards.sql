-- Shards whose primary Patroni chooses (shardd/failover/patroni.py).  'builtin': shardd's
-- monitor promotes, repoints and sets the commit mode; 'patroni': Patroni does all three
-- on its DCS and shardd follows its leader.  patroni_url is the node's Patroni REST API
-- (http://host:port), needed for every node of a 'patroni' shard.
ALTER TABLE shardd_shards ADD COLUMN failover_mode text NOT NULL DEFAULT 'builtin'
    CHECK (failover_mode IN ('builtin', 'patroni'));
ALTER TABLE shardd_nodes ADD COLUMN patroni_url text
    CHECK (patroni_url ~ '^https?://[^/\s]+$');
-- 'patroni': the catalog followed a leader Patroni elected.
ALTER TABLE shardd_failovers DROP CONSTRAINT shardd_failovers_kind_check;
ALTER TABLE shardd_failovers ADD CONSTRAINT shardd_failovers_kind_check
    CHECK (kind IN ('automatic', 'planned', 'forced', 'patroni'));
