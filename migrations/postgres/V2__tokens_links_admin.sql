-- Provider tokens (sealed by the vault), verified-email linking, audit
-- details, and the indexes the admin API reads by.

-- One sealed token per identity; it goes with the identity (unlink, user
-- deletion) through the cascade.
CREATE TABLE provider_tokens (
    provider   TEXT        NOT NULL,
    subject    TEXT        NOT NULL,
    key_id     TEXT        NOT NULL,
    nonce      BYTEA       NOT NULL,
    ciphertext BYTEA       NOT NULL,
    -- Compare-and-swap counter: bumped by every token write.
    version    BIGINT      NOT NULL,
    usable     BOOLEAN     NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, subject),
    FOREIGN KEY (provider, subject) REFERENCES identities (provider, subject)
        ON DELETE CASCADE
);

-- For admin calls, the RPC name; otherwise non-secret context such as the
-- rule that linked an identity.
ALTER TABLE audit_events ADD COLUMN detail TEXT NULL;

-- Verified-email linking compares lower(email) among verified identities
-- only; the expression and predicate match that query exactly.
CREATE INDEX identities_verified_email_idx ON identities (lower(email))
    WHERE email_verified;

-- The admin user list pages newest first by (created_at, id).
CREATE INDEX users_created_at_idx ON users (created_at, id);

-- Audit reads now page by id (newest first, keyset on id), so the filter
-- columns are followed by id rather than by `at`.
DROP INDEX audit_events_user_id_idx;
DROP INDEX audit_events_provider_idx;
CREATE INDEX audit_events_user_id_idx ON audit_events (user_id, id);
CREATE INDEX audit_events_provider_idx ON audit_events (provider, id);
