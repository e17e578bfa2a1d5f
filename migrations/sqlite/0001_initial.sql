-- Apps (client_key) the daemon holds tokens for, the merchants (account_id)
-- each app serves, and one token row per app. Times are Unix milliseconds.

CREATE TABLE apps (
    client_key    TEXT PRIMARY KEY NOT NULL,
    client_secret TEXT NOT NULL,
    -- 'config' when synced from the config file, 'admin' when added over AdminService.
    source        TEXT NOT NULL CHECK (source IN ('config', 'admin')),
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE merchants (
    account_id TEXT PRIMARY KEY NOT NULL,
    client_key TEXT NOT NULL REFERENCES apps (client_key) ON DELETE CASCADE,
    source     TEXT NOT NULL CHECK (source IN ('config', 'admin')),
    created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX merchants_by_app ON merchants (client_key);

CREATE TABLE tokens (
    client_key           TEXT PRIMARY KEY NOT NULL REFERENCES apps (client_key) ON DELETE CASCADE,
    access_token         TEXT,
    -- Increases with every fetched token; never reused, so a stale compare fails.
    generation           INTEGER NOT NULL DEFAULT 0,
    -- When the fetch of the current token started: expiry counts from here.
    fetched_at           INTEGER,
    expires_at           INTEGER,
    -- Set when Douyin rejected the current token; such a token is never loaded again.
    invalidated_at       INTEGER,
    last_error           TEXT,
    last_error_at        INTEGER,
    -- 1 when the last failure was permanent (bad secret, unknown app).
    last_error_permanent INTEGER NOT NULL DEFAULT 0,
    consecutive_failures INTEGER NOT NULL DEFAULT 0
) STRICT;
