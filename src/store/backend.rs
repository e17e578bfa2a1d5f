//! The two database engines behind the store: SQLite (embedded, one daemon)
//! and PostgreSQL (several daemons sharing one database). Each query is
//! written once, in SQL both engines read alike (`$1` parameters, `ON
//! CONFLICT`, `RETURNING`, `BIGINT`-sized integers), and `on_backend!` runs
//! it on whichever engine the store opened, so the two cannot drift apart.

use sqlx::{PgConnection, PgPool, Postgres, Sqlite, SqliteConnection, SqlitePool};

use super::{StoreError, query_error};

/// One value for either engine.
#[derive(Clone)]
pub(crate) enum Backend<ForSqlite, ForPostgres> {
    Sqlite(ForSqlite),
    Postgres(ForPostgres),
}

/// The connection pool.
pub(super) type Pool = Backend<SqlitePool, PgPool>;
/// A transaction begun on the pool.
pub(super) type Transaction =
    Backend<sqlx::Transaction<'static, Sqlite>, sqlx::Transaction<'static, Postgres>>;
/// A connection taken out of the pool for good (the event writer's).
pub(super) type Connection = Backend<SqliteConnection, PgConnection>;

/// Runs `$body` with `$executor` bound to the engine's value inside `$target`
/// (a `&Pool`, `&mut Transaction` or `&mut Connection`): the same tokens are
/// compiled once per engine, so a query is written once and typed for both.
macro_rules! on_backend {
    ($target:expr, $executor:ident => $body:expr) => {
        match $target {
            $crate::store::backend::Backend::Sqlite($executor) => $body,
            $crate::store::backend::Backend::Postgres($executor) => $body,
        }
    };
}
pub(super) use on_backend;

impl Pool {
    pub(super) async fn begin(&self, operation: &'static str) -> Result<Transaction, StoreError> {
        Ok(match self {
            Self::Sqlite(pool) => {
                Backend::Sqlite(pool.begin().await.map_err(query_error(operation))?)
            }
            Self::Postgres(pool) => {
                Backend::Postgres(pool.begin().await.map_err(query_error(operation))?)
            }
        })
    }

    pub(super) async fn close(&self) {
        on_backend!(self, pool => pool.close().await);
    }

    pub(super) fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

impl Transaction {
    pub(super) async fn commit(self, operation: &'static str) -> Result<(), StoreError> {
        on_backend!(self, transaction => transaction.commit().await.map_err(query_error(operation)))
    }

    /// Ends a read-only transaction (nothing to commit; ending it releases its snapshot).
    pub(super) async fn rollback(self, operation: &'static str) -> Result<(), StoreError> {
        on_backend!(self, transaction => transaction.rollback().await.map_err(query_error(operation)))
    }
}
