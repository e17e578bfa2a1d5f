-- Sealing, API clients and the audit trail.

-- Daemon-wide facts; 'key_check' holds a value sealed with the master key, so a
-- wrong key is detected at start-up before anything is read or written.
CREATE TABLE meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

-- Services allowed to call the daemon. Only the SHA-256 of each key is kept.
CREATE TABLE clients (
    name       TEXT PRIMARY KEY NOT NULL,
    key_sha256 TEXT NOT NULL UNIQUE,
    -- JSON arrays; apps/merchants NULL means every app/merchant.
    scopes     TEXT NOT NULL,
    apps       TEXT,
    merchants  TEXT,
    source     TEXT NOT NULL CHECK (source IN ('config', 'admin')),
    created_at INTEGER NOT NULL
) STRICT;

-- Who did what with which token: fetches, forced refreshes, hand-outs, invalid
-- reports. Apps and tokens appear as fingerprints only.
CREATE TABLE audit (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    at                INTEGER NOT NULL,
    client            TEXT NOT NULL,
    action            TEXT NOT NULL,
    app               TEXT NOT NULL,
    reason            TEXT NOT NULL,
    token_fingerprint TEXT NOT NULL,
    -- Identical hand-outs within one flush are recorded once with their count.
    count             INTEGER NOT NULL DEFAULT 1
) STRICT;

CREATE INDEX audit_by_time ON audit (at);
