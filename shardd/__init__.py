"""shardd: a sharded JSON item store over PostgreSQL shards with streaming replicas."""

__version__ = "0.1.0"
