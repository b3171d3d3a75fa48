-- 0004: bulk runs (and Merge & Deploy), so a run outlives a server restart:
-- the restarted server continues it from here, and ended runs can still be
-- read. record is the fleet.v1.BulkCommand the API returns; plan is the JSON
-- of what continuing needs (steps, batches, each host's progress). seq is
-- the order of creation, even for runs created in the same millisecond.

CREATE TABLE bulk_runs (
    seq         INTEGER NOT NULL PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    state       INTEGER NOT NULL,
    record      BLOB    NOT NULL,
    plan        TEXT    NOT NULL
);

-- Unfinished runs at start; pruning walks ended runs newest first.
CREATE INDEX bulk_runs_finished ON bulk_runs (finished_at, seq);
