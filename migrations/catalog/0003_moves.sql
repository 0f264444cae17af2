-- Online slot moves: one row per rebalance run and one per move (a group of slots from
-- one source shard to one target).  Every step of a move is recorded here before the
-- next starts, so a run that died resumes or aborts from where it stopped.
CREATE TABLE shardd_rebalances (
    id          bigserial PRIMARY KEY,
    state       text NOT NULL DEFAULT 'running'
                CHECK (state IN ('running', 'done', 'aborted', 'failed')),
    reason      text NOT NULL DEFAULT '',
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shardd_moves (
    id              bigserial PRIMARY KEY,
    rebalance       bigint NOT NULL REFERENCES shardd_rebalances (id),
    source          text NOT NULL,
    target          text NOT NULL,
    slots           integer[] NOT NULL,
    phase           text NOT NULL DEFAULT 'planned'
                    CHECK (phase IN ('planned', 'copying', 'catching_up', 'frozen',
                                     'flipped', 'done', 'aborted')),
    position        text,  -- the source change log position (pg_snapshot) applied so far
    rows_copied     bigint NOT NULL DEFAULT 0,
    bytes_copied    bigint NOT NULL DEFAULT 0,
    changes_applied bigint NOT NULL DEFAULT 0,
    backlog         bigint,
    pause_ms        double precision,  -- frozen to flipped
    epoch           bigint,  -- the epoch that published the flip
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX shardd_moves_open ON shardd_moves (rebalance) WHERE phase NOT IN ('done', 'aborted');
