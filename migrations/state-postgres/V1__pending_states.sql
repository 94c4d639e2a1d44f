-- Pending logins and link tickets that every replica shares (src/state/postgres.rs
-- describes each column and what a reader of this table learns). Its own
-- refinery history (authbroker_state_migrations): [state] url may name a
-- different server than database.url.

CREATE TABLE pending_states (
    -- seal::lookup_key: SHA-256 of a label, the kind and the token; never the token.
    key         BYTEA       PRIMARY KEY,
    kind        TEXT        NOT NULL CHECK (kind IN ('login', 'ticket')),
    status      TEXT        NOT NULL CHECK (status IN ('pending', 'claimed', 'finished')),
    expires_at  TIMESTAMPTZ NOT NULL,
    -- When the row is forgotten; every operation treats a row past it as absent.
    evict_at    TIMESTAMPTZ NOT NULL,
    -- SHA-256 of what the claiming attempt presented; NULL unless claimed.
    fingerprint BYTEA       NULL,
    -- Claims so far: 0 while pending.
    attempt     INTEGER     NOT NULL DEFAULT 0,
    lease_until TIMESTAMPTZ NULL,
    -- Sealed with a key derived from the token (seal.rs); NULL once finished.
    sealed      BYTEA       NULL,
    progress    BYTEA       NULL
);

-- The sweep deletes the rows past their deadline, oldest first, in batches.
CREATE INDEX pending_states_evict_at_idx ON pending_states (evict_at);
