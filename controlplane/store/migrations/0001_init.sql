-- 0001: the core tables. Timestamps are INTEGER unix milliseconds (UTC);
-- NULL means "never". Records are protobuf-marshalled messages, so most
-- field additions need no migration.

CREATE TABLE hosts (
    id         TEXT    NOT NULL PRIMARY KEY,
    -- fleetv1.Host without its live fields (online, metrics, running command,
    -- last seen).
    record     BLOB    NOT NULL,
    -- sha256 of the host's agent token; NULL when none is set.
    token_hash BLOB    UNIQUE,
    created_at INTEGER NOT NULL,
    last_seen  INTEGER
);

CREATE TABLE users (
    name          TEXT    NOT NULL PRIMARY KEY,
    password_hash BLOB    NOT NULL,
    totp_secret   TEXT    NOT NULL DEFAULT '',
    created_at    INTEGER NOT NULL
);

CREATE TABLE sessions (
    id_hash    BLOB    NOT NULL PRIMARY KEY,
    user_name  TEXT    NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    csrf_token TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    last_used  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE api_tokens (
    name       TEXT    NOT NULL PRIMARY KEY,
    hash       BLOB    NOT NULL UNIQUE,
    scope      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);

CREATE TABLE commands (
    id          TEXT    NOT NULL PRIMARY KEY,
    host_id     TEXT    NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    -- typesv1.CommandState number.
    state       INTEGER NOT NULL,
    -- Lines stored in command_lines; authoritative over the record's field.
    line_count  INTEGER NOT NULL DEFAULT 0,
    -- fleetv1.Command.
    record      BLOB    NOT NULL
);
CREATE INDEX commands_host_created ON commands (host_id, created_at);
CREATE INDEX commands_created ON commands (created_at);

CREATE TABLE command_lines (
    command_id TEXT    NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    -- typesv1.OutputStream number.
    stream     INTEGER NOT NULL,
    text       TEXT    NOT NULL,
    time       INTEGER,
    PRIMARY KEY (command_id, seq)
);

CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    time    INTEGER NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    host_id TEXT    NOT NULL DEFAULT '',
    result  TEXT    NOT NULL DEFAULT '',
    detail  TEXT    NOT NULL DEFAULT ''
);
