-- Per-table caching: what the item cache keeps (off, hot keys only, every item read), how
-- long an entry lives, and the max-age sent to HTTP caches in front of shardd.
ALTER TABLE shardd_tables
    ADD COLUMN cache text NOT NULL DEFAULT 'hot' CHECK (cache IN ('off', 'hot', 'all')),
    ADD COLUMN cache_ttl double precision NOT NULL DEFAULT 1.0
        CHECK (cache_ttl > 0 AND cache_ttl <= 3600),
    ADD COLUMN max_age integer NOT NULL DEFAULT 0 CHECK (max_age >= 0 AND max_age <= 86400);
