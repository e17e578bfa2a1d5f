-- The PostgreSQL schema: the same tables as the SQLite migrations 0001-0004
-- (same names, same columns, integers as BIGINT, Unix milliseconds), plus
-- what several daemons sharing one database need to agree on (the fetch
-- lease on `tokens`, `token_fetches`, `instances`).

CREATE TABLE apps (
    client_key    TEXT PRIMARY KEY,
    client_secret TEXT NOT NULL,
    source        TEXT NOT NULL CHECK (source IN ('config', 'admin')),
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

CREATE TABLE merchants (
    account_id TEXT PRIMARY KEY,
    client_key TEXT NOT NULL REFERENCES apps (client_key) ON DELETE CASCADE,
    source     TEXT NOT NULL CHECK (source IN ('config', 'admin')),
    created_at BIGINT NOT NULL
);

CREATE INDEX merchants_by_app ON merchants (client_key);

CREATE TABLE tokens (
    client_key           TEXT PRIMARY KEY REFERENCES apps (client_key) ON DELETE CASCADE,
    access_token         TEXT,
    -- Increases with every fetched token; a write must bring exactly the next one.
    generation           BIGINT NOT NULL DEFAULT 0,
    fetched_at           BIGINT,
    expires_at           BIGINT,
    invalidated_at       BIGINT,
    last_error           TEXT,
    last_error_at        BIGINT,
    last_error_permanent BIGINT NOT NULL DEFAULT 0,
    consecutive_failures BIGINT NOT NULL DEFAULT 0,
    -- The daemon fetching this app's next token, and until when its lease
    -- holds: a lease past its end (a daemon that died) may be taken over.
    fetch_lease_holder   TEXT,
    fetch_lease_until    BIGINT
);

CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE clients (
    name       TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL UNIQUE,
    scopes     TEXT NOT NULL,
    apps       TEXT,
    merchants  TEXT,
    source     TEXT NOT NULL CHECK (source IN ('config', 'admin')),
    created_at BIGINT NOT NULL
);

CREATE TABLE audit (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                BIGINT NOT NULL,
    client            TEXT NOT NULL,
    action            TEXT NOT NULL,
    app               TEXT NOT NULL,
    reason            TEXT NOT NULL,
    token_fingerprint TEXT NOT NULL,
    count             BIGINT NOT NULL DEFAULT 1
);

CREATE INDEX audit_by_time ON audit (at);

CREATE TABLE after_sale_audit_decisions (
    account_id     TEXT NOT NULL,
    order_id       TEXT NOT NULL,
    certificate_id TEXT NOT NULL,
    approve        BIGINT NOT NULL CHECK (approve IN (0, 1)),
    reject_reason  TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'refused', 'unknown')),
    answer_body    TEXT,
    logid          TEXT NOT NULL DEFAULT '',
    client         TEXT NOT NULL,
    app            TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (account_id, order_id, certificate_id)
);

CREATE TABLE after_sale_events (
    -- An identity is never reused; writers take an advisory lock per group,
    -- so sequences also commit in order across daemons.
    sequence    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_key  TEXT NOT NULL,
    msg_id      TEXT NOT NULL,
    event       TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    raw_json    TEXT NOT NULL,
    UNIQUE (client_key, msg_id)
);

CREATE INDEX after_sale_events_by_time ON after_sale_events (received_at);

-- Every token endpoint call any daemon started, for the cluster-wide budget
-- (Douyin: 500 per 5 minutes) and min_interval. Pruned as they age out.
CREATE TABLE token_fetches (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_key TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    instance   TEXT NOT NULL
);

CREATE INDEX token_fetches_by_time ON token_fetches (started_at);
CREATE INDEX token_fetches_by_app ON token_fetches (client_key, started_at);

-- The daemons serving from this database, each with its heartbeat: the
-- living ones share each app's Douyin rate between them.
CREATE TABLE instances (
    instance     TEXT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
