-- 0002: settings, API token last use, and the per-host audit index.

CREATE TABLE settings (
    key   TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);

ALTER TABLE api_tokens ADD COLUMN last_used_at INTEGER;

-- Per-host audit pages walk id downwards.
CREATE INDEX audit_host_id ON audit (host_id, id);

-- Session expiry sweeps.
CREATE INDEX sessions_expires ON sessions (expires_at);
