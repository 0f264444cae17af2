-- Registered change-feed consumers (shardd/changefeed.py): the cursor each one has
-- committed.  Each shard also holds the consumer's position there in shardd_consumers
-- (as 'feed:<name>'), so trimming keeps what it has not read, up to
-- feed_retention_cap.
CREATE TABLE shardd_feed_consumers (
    name        text PRIMARY KEY,
    cursor      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
