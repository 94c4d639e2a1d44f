-- A login's audit events carry its id (a hash of its state, never the
-- state), so a retried CompleteLogin whose earlier attempt committed is
-- answered with that attempt's result instead of binding a second time.
ALTER TABLE audit_events ADD COLUMN login_id TEXT NULL;
CREATE UNIQUE INDEX audit_events_login_id_key ON audit_events (login_id)
    WHERE login_id IS NOT NULL AND kind = 'login_succeeded';
