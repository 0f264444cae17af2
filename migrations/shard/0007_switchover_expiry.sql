-- A switchover's fence says when the process that set it gives up at the latest (its
-- catch-up and promotion timeouts).  A node still fenced for a switchover past that
-- moment was left by a process that died: the monitor finishes the switchover (see
-- shardd/failover/steps.py, finish_switchover).  NULL for any other fence.
ALTER TABLE shardd_node_state ADD COLUMN expires_at timestamptz;
-- A fresh value with every fence, kept by an unfence: a replica whose row carries the
-- fenced primary's token has replayed that fence (no clocks compared).
ALTER TABLE shardd_node_state ADD COLUMN token uuid;
