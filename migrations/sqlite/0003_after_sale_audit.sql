-- Refund decisions (抖音码核销后退款审批) sent through the daemon, one row per
-- refund: the daemon's memory that makes each decision exactly-once for callers.
-- The intent is written (state 'pending') before the request leaves for Douyin;
-- the outcome replaces it. Rows are never pruned: forgetting one would let a
-- repeat reach Douyin again. Times are Unix milliseconds.
CREATE TABLE after_sale_audit_decisions (
    account_id     TEXT NOT NULL,
    order_id       TEXT NOT NULL,
    certificate_id TEXT NOT NULL,
    -- 1 approves the refund, 0 rejects it with reject_reason.
    approve        INTEGER NOT NULL CHECK (approve IN (0, 1)),
    reject_reason  TEXT NOT NULL,
    -- pending: being sent (or the daemon stopped while it was);
    -- applied: Douyin accepted it; refused: Douyin answered an error code;
    -- unknown: the request may have reached Douyin but no answer came.
    state          TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'refused', 'unknown')),
    -- Douyin's answer body as received (applied or refused), so a repeat gets it back.
    answer_body    TEXT,
    logid          TEXT NOT NULL DEFAULT '',
    -- The API client that decided (its name) and the app that sent it (app:<fingerprint>).
    client         TEXT NOT NULL,
    app            TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (account_id, order_id, certificate_id)
) STRICT;
