-- Zones: a label per node (a data center, an availability zone, a rack).  Reads prefer
-- replicas in the instance's own zone, promotions the old primary's zone (see
-- shardd/router.py and shardd/failover/decisions.py).  '' is no zone.
ALTER TABLE shardd_nodes ADD COLUMN zone text NOT NULL DEFAULT ''
    CHECK (zone ~ '^[A-Za-z0-9_.-]{0,64}$');
