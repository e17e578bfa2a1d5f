//! The `meta` table: daemon-wide facts. Here `key_check`, a value sealed
//! with the master key so that a wrong key is recognised before anything is
//! read or written; `after_sale_events.rs` keeps how far events were pruned
//! in it too. No table type of its own: `Store::open` reads it before a
//! `Store` exists, and only the store itself writes it.

use super::backend::{Backend, Pool, Transaction, on_backend};
use super::{StoreError, query_error};
use crate::sealing::MasterKey;

/// The plaintext sealed into `meta.key_check`, to recognise the right key.
const KEY_CHECK_PLAINTEXT: &str = "douyin-tokend master key check";
/// What the key check is bound to, like every sealed value to its row.
const KEY_CHECK_BINDING: &str = "meta.key_check";

/// The sealed key check, or None for a database without one: new (no `meta`
/// table yet, since no migration ran) or sealed by no key so far. Read before
/// any migration, so it must not assume the schema.
pub(super) async fn read_key_check(pool: &Pool) -> Result<Option<String>, StoreError> {
    let meta_exists: bool = match pool {
        Backend::Sqlite(pool) => sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
        )
        .fetch_one(pool)
        .await,
        Backend::Postgres(pool) => {
            sqlx::query_scalar("SELECT to_regclass('meta') IS NOT NULL")
                .fetch_one(pool)
                .await
        }
    }
    .map_err(query_error("look for the meta table"))?;
    if !meta_exists {
        return Ok(None);
    }
    on_backend!(pool, pool => sqlx::query_scalar("SELECT value FROM meta WHERE name = 'key_check'")
        .fetch_optional(pool)
        .await)
    .map_err(query_error("read the key check"))
}

/// Whether `master_key` is the key the database was sealed with.
pub(super) fn key_check_opens_with(sealed_key_check: &str, master_key: &MasterKey) -> bool {
    master_key
        .open(KEY_CHECK_BINDING, sealed_key_check)
        .is_ok_and(|plaintext| plaintext == KEY_CHECK_PLAINTEXT)
}

/// Records (or replaces) the key check sealed with `master_key`.
pub(super) async fn record_key_check(
    transaction: &mut Transaction,
    master_key: &MasterKey,
) -> Result<(), StoreError> {
    let sealed = master_key.seal(KEY_CHECK_BINDING, KEY_CHECK_PLAINTEXT);
    on_backend!(transaction, transaction => sqlx::query(
        "INSERT INTO meta (name, value) VALUES ('key_check', $1)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )
    .bind(&sealed)
    .execute(&mut **transaction)
    .await
    .map(drop))
    .map_err(query_error("record the key check"))?;
    Ok(())
}
