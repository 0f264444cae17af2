"""Views: denormalized copies of a table, re-partitioned by another key, with fields
joined from co-located items, kept current from the source shards' change logs.

* :mod:`.definition` — what a view is and what it makes of one item (pure);
* :mod:`.rows` — reading source items and joined items on a source shard;
* :mod:`.keeper` — maintenance: one instance per source shard applies its change log;
* :mod:`.manage` — declare, describe, delete, verify, repair, rebuild.

View rows are items of an internal table (``~v:<view>``) placed by the view's partition
key, so placement, fencing, slot moves, replicas and failover treat them like any item.
"""
