-- Provider tokens (sealed by the vault), verified-email linking, audit
-- details, and the indexes the admin API reads by. STRICT like V1.

-- One sealed token per identity; it goes with the identity (unlink, user
-- deletion) through the cascade (foreign_keys is switched on per connection).
CREATE TABLE provider_tokens (
    provider   TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    key_id     TEXT    NOT NULL,
    nonce      BLOB    NOT NULL,
    ciphertext BLOB    NOT NULL,
    -- Compare-and-swap counter: bumped by every token write.
    version    INTEGER NOT NULL,
    usable     INTEGER NOT NULL CHECK (usable IN (0, 1)),
    -- Unix microseconds, like every timestamp here.
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (provider, subject),
    FOREIGN KEY (provider, subject) REFERENCES identities (provider, subject)
        ON DELETE CASCADE
) STRICT;

-- For admin calls, the RPC name; otherwise non-secret context such as the
-- rule that linked an identity.
ALTER TABLE audit_events ADD COLUMN detail TEXT NULL;

-- Verified-email linking compares lower(email) among verified identities
-- only; the expression and predicate match that query exactly (SQLite uses
-- a partial index only when the query repeats its WHERE term).
CREATE INDEX identities_verified_email_idx ON identities (lower(email))
    WHERE email_verified = 1;

-- The admin user list pages newest first by (created_at, id).
CREATE INDEX users_created_at_idx ON users (created_at, id);

-- Audit reads now page by id (newest first, keyset on id), so the filter
-- columns are followed by id rather than by `at`.
DROP INDEX audit_events_user_id_idx;
DROP INDEX audit_events_provider_idx;
CREATE INDEX audit_events_user_id_idx ON audit_events (user_id, id);
CREATE INDEX audit_events_provider_idx ON audit_events (provider, id);
