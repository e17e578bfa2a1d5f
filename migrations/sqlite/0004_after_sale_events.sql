-- Refund-request notifications (抖音码退款申请通知) the webhook verified and
-- acknowledged. Version 0004: 0003 belongs to the after-sale list/audit work,
-- and sqlx applies a missing lower version whenever it appears.
--
-- Not sealed: a notification holds no token and no secret. The client key is
-- stored as plainly as in `apps`; the signature is not stored at all (with
-- the body it would allow guessing the app's secret offline).
CREATE TABLE after_sale_events (
    -- AUTOINCREMENT: a sequence is never reused, even after the newest rows
    -- were pruned, so a watcher's "after N" never skips a new event.
    sequence    INTEGER PRIMARY KEY AUTOINCREMENT,
    client_key  TEXT NOT NULL,
    msg_id      TEXT NOT NULL,
    event       TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    -- Unix milliseconds.
    received_at INTEGER NOT NULL,
    -- The body byte for byte (UTF-8 JSON); the decoded fields are read from it.
    raw_json    TEXT NOT NULL,
    -- Douyin repeats a push with the same Msg-Id: stored once per app.
    UNIQUE (client_key, msg_id)
) STRICT;

CREATE INDEX after_sale_events_by_time ON after_sale_events (received_at);
