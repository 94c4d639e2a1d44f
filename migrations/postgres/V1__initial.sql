-- Users, the identities bound to them, and the audit trail.
-- Timestamps are timestamptz (microsecond precision, like domain::now_micros).

CREATE TABLE users (
    id         TEXT        PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE identities (
    provider       TEXT        NOT NULL,
    subject        TEXT        NOT NULL,
    user_id        TEXT        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    union_id       TEXT        NULL,
    username       TEXT        NULL,
    display_name   TEXT        NULL,
    avatar_url     TEXT        NULL,
    email          TEXT        NULL,
    email_verified BOOLEAN     NOT NULL DEFAULT FALSE,
    created_at     TIMESTAMPTZ NOT NULL,
    last_login_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, subject),
    -- One identity per provider per user; its index (user_id first) also
    -- serves "identities of a user", so no separate user_id index is needed.
    CONSTRAINT identities_user_provider_key UNIQUE (user_id, provider)
);

-- Union ids (e.g. QQ/WeChat unionid) link accounts across apps of one
-- provider; most providers have none, hence the partial index.
CREATE INDEX identities_union_id_idx ON identities (provider, union_id)
    WHERE union_id IS NOT NULL;

-- No foreign key to users: the audit trail outlives deleted users.
CREATE TABLE audit_events (
    id       BIGSERIAL   PRIMARY KEY,
    at       TIMESTAMPTZ NOT NULL,
    kind     TEXT        NOT NULL,
    actor    TEXT        NULL,
    provider TEXT        NULL,
    subject  TEXT        NULL,
    user_id  TEXT        NULL,
    reason   TEXT        NULL
);

-- Reads are "newest first", optionally filtered by user or provider; the
-- filter column leads and `at` follows so the index also gives the order.
CREATE INDEX audit_events_at_idx ON audit_events (at);
CREATE INDEX audit_events_user_id_idx ON audit_events (user_id, at);
CREATE INDEX audit_events_provider_idx ON audit_events (provider, at);
