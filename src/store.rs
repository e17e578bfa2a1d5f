//! The SQLite store: opening the pool (WAL, busy timeout, foreign keys),
//! running the embedded migrations, and every query the daemon makes. The
//! only module that writes SQL.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::domain::{AccessToken, AccountId, ClientKey, ClientSecret};
use crate::sealing::{MasterKey, SealError};

/// A store failure. Messages name the operation, never a value.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error while trying to {operation}: {source}")]
    Query {
        operation: &'static str,
        source: sqlx::Error,
    },
    #[error("the database holds a value it should not: {0}")]
    Corrupt(String),
    #[error(
        "the master key file {key_path} is missing, but the database {database} was sealed with a master key; \
         restore the key file (or point master_key_file at it) — nothing was changed"
    )]
    MasterKeyMissing { key_path: String, database: String },
    #[error(
        "the master key in {key_path} does not open the database {database} (a different key?); \
         start with the right key file — nothing was changed"
    )]
    MasterKeyMismatch { key_path: String, database: String },
    #[error(
        "another douyin-tokend process is using the database {database} (it holds {database}.lock); \
         stop it first — two owners of one token store would fetch against each other"
    )]
    InUse { database: String },
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// What opening the store did about the master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeyOutcome {
    /// The key file existed and opens the database.
    Loaded,
    /// A new database: a new key was written to this file.
    Created(PathBuf),
}

/// The plaintext sealed into `meta.key_check`, to recognise the right key.
const KEY_CHECK_PLAINTEXT: &str = "douyin-tokend master key check";
/// What the key check is bound to, like every sealed value to its row.
const KEY_CHECK_BINDING: &str = "meta.key_check";

/// The embedded migrations; `open` runs them once the master key is proven.
static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

fn secret_binding(client_key: &ClientKey) -> String {
    format!("apps.client_secret/{}", client_key.expose())
}

fn token_binding(client_key: &ClientKey) -> String {
    format!("tokens.access_token/{}", client_key.expose())
}

fn query_error(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { operation, source }
}

/// Where an app or a merchant was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config file; the next start-up removes it if the file no longer has it.
    Config,
    /// AdminService; only AdminService removes it.
    Admin,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "config" => Ok(Self::Config),
            "admin" => Ok(Self::Admin),
            other => Err(StoreError::Corrupt(format!("unknown source {other:?}"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AppRecord {
    pub client_key: ClientKey,
    pub client_secret: ClientSecret,
    pub source: Source,
    pub merchant_count: i64,
}

#[derive(Debug, Clone)]
pub struct MerchantRecord {
    pub account_id: AccountId,
    pub client_key: ClientKey,
    pub source: Source,
}

/// The stored token state of one app.
#[derive(Debug, Clone, Default)]
pub struct TokenRecord {
    pub access_token: Option<AccessToken>,
    pub generation: i64,
    pub fetched_at_ms: Option<i64>,
    pub expires_at_ms: Option<i64>,
    pub invalidated_at_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
    pub last_error_permanent: bool,
    pub consecutive_failures: i64,
}

/// An API client as stored: the key's SHA-256 in hex, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub name: String,
    pub key_sha256: String,
    pub scopes: Vec<String>,
    /// None: every app.
    pub apps: Option<Vec<String>>,
    /// None: every merchant.
    pub merchants: Option<Vec<String>>,
    pub source: Source,
}

/// One line of the audit trail. Apps and tokens appear as fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub at_ms: i64,
    pub client: String,
    pub action: String,
    pub app: String,
    pub reason: String,
    pub token_fingerprint: String,
    pub count: i64,
}

/// A freshly fetched token, to be committed before anyone uses it.
#[derive(Debug, Clone)]
pub struct NewToken<'a> {
    pub client_key: &'a ClientKey,
    pub access_token: &'a AccessToken,
    pub generation: i64,
    pub fetched_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A failed fetch, recorded without touching the stored (still valid) token.
#[derive(Debug, Clone)]
pub struct FetchFailure<'a> {
    pub client_key: &'a ClientKey,
    pub message: &'a str,
    pub at_ms: i64,
    pub permanent: bool,
    pub consecutive_failures: i64,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    master_key: Arc<MasterKey>,
    /// An exclusive lock on `<database>.lock`, held until `close`: one owner per token store.
    owner_lock: Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

impl Store {
    /// Opens (creating if needed) the database file, brings its schema up to
    /// date and unseals it with the master key in `master_key_file`. A new
    /// database gets a new key file (mode 0600); an existing one refuses to open
    /// without its own key, and nothing is written until the key is proven right.
    pub async fn open(
        path: &Path,
        master_key_file: &Path,
    ) -> Result<(Self, MasterKeyOutcome), StoreError> {
        Self::open_with_migrations(path, master_key_file, &MIGRATIONS).await
    }

    /// `open` with a given set of migrations, so a test can have one pending.
    async fn open_with_migrations(
        path: &Path,
        master_key_file: &Path,
        migrations: &Migrator,
    ) -> Result<(Self, MasterKeyOutcome), StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let database = path.display().to_string();
        let owner_lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(format!("{database}.lock"))
            .map_err(|error| open_error(sqlx::Error::Io(error)))?;
        if owner_lock.try_lock().is_err() {
            return Err(StoreError::InUse { database });
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(open_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL is durable across process crashes; only a power
            // loss may lose the last commits, which a restart re-fetches.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        match Self::check_key_and_migrate(&pool, master_key_file, &database, migrations).await {
            Ok((master_key, outcome)) => Ok((
                Self {
                    pool,
                    master_key: Arc::new(master_key),
                    owner_lock: Arc::new(std::sync::Mutex::new(Some(owner_lock))),
                },
                outcome,
            )),
            Err(error) => {
                // Closed before the lock file is released, so no connection
                // outlives the refusal.
                pool.close().await;
                Err(error)
            }
        }
    }

    /// Proves the master key against `meta.key_check` before the migrations
    /// run, so a wrong or missing key leaves the database as it was (a
    /// migration is a write). A database without a key check (new, or from
    /// before sealing) gets one, after its migrations, under a new or the
    /// given key.
    async fn check_key_and_migrate(
        pool: &SqlitePool,
        master_key_file: &Path,
        database: &str,
        migrations: &Migrator,
    ) -> Result<(MasterKey, MasterKeyOutcome), StoreError> {
        let key_check = read_key_check(pool).await?;
        let key_path = master_key_file.display().to_string();
        let database = database.to_owned();
        let key_file_exists = master_key_file.exists();
        let existing_key = match (&key_check, key_file_exists) {
            (Some(_), false) => return Err(StoreError::MasterKeyMissing { key_path, database }),
            (_, true) => Some(MasterKey::read(master_key_file)?),
            (None, false) => None,
        };
        if let (Some(sealed), Some(key)) = (&key_check, &existing_key) {
            let opened = key.open(KEY_CHECK_BINDING, sealed);
            if opened.ok().as_deref() != Some(KEY_CHECK_PLAINTEXT) {
                return Err(StoreError::MasterKeyMismatch { key_path, database });
            }
        }
        migrations.run(pool).await?;
        let (master_key, outcome) = match existing_key {
            Some(key) => (key, MasterKeyOutcome::Loaded),
            None => {
                let key = MasterKey::generate();
                key.write_new(master_key_file)?;
                (key, MasterKeyOutcome::Created(master_key_file.to_owned()))
            }
        };
        if key_check.is_none() {
            seal_for_the_first_time(pool, &master_key).await?;
        }
        Ok((master_key, outcome))
    }

    /// Re-seals every secret and token under `new_key` in one transaction.
    /// Returns how many values were re-sealed. The caller then replaces the key file.
    pub async fn rotate_master_key(&mut self, new_key: MasterKey) -> Result<usize, StoreError> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin key rotation"))?;
        let old_key = &self.master_key;
        let resealed = reseal_every_value(&mut transaction, |binding, sealed| {
            Ok(new_key.seal(binding, &old_key.open(binding, sealed)?))
        })
        .await?;
        record_key_check(&mut transaction, &new_key).await?;
        transaction
            .commit()
            .await
            .map_err(query_error("commit key rotation"))?;
        self.master_key = Arc::new(new_key);
        Ok(resealed)
    }

    /// Closes the pool and gives up ownership of the database.
    pub async fn close(&self) {
        self.pool.close().await;
        let lock = self
            .owner_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(lock);
    }

    // === apps ===

    /// Adds an app or replaces its secret. Returns true when it is new.
    pub async fn put_app(
        &self,
        client_key: &ClientKey,
        client_secret: &ClientSecret,
        source: Source,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin put_app"))?;
        let existed = sqlx::query("SELECT 1 FROM apps WHERE client_key = ?")
            .bind(client_key.expose())
            .fetch_optional(&mut *transaction)
            .await
            .map_err(query_error("look up an app"))?
            .is_some();
        sqlx::query(
            "INSERT INTO apps (client_key, client_secret, source, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (client_key) DO UPDATE
             SET client_secret = excluded.client_secret, source = excluded.source,
                 updated_at = excluded.updated_at",
        )
        .bind(client_key.expose())
        .bind(
            self.master_key
                .seal(&secret_binding(client_key), client_secret.expose()),
        )
        .bind(source.as_str())
        .bind(now_ms)
        .execute(&mut *transaction)
        .await
        .map_err(query_error("store an app"))?;
        // A new secret deserves a new try: forget a permanent failure.
        sqlx::query(
            "INSERT INTO tokens (client_key) VALUES (?1)
             ON CONFLICT (client_key) DO UPDATE SET last_error_permanent = 0",
        )
        .bind(client_key.expose())
        .execute(&mut *transaction)
        .await
        .map_err(query_error("prepare an app's token row"))?;
        transaction
            .commit()
            .await
            .map_err(query_error("commit put_app"))?;
        Ok(!existed)
    }

    /// Removes an app with its merchants and token. Returns how many merchants
    /// went with it, or None when there was no such app.
    pub async fn remove_app(&self, client_key: &ClientKey) -> Result<Option<i64>, StoreError> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin remove_app"))?;
        let merchants: i64 = sqlx::query("SELECT COUNT(*) FROM merchants WHERE client_key = ?")
            .bind(client_key.expose())
            .fetch_one(&mut *transaction)
            .await
            .map_err(query_error("count an app's merchants"))?
            .get(0);
        let removed = sqlx::query("DELETE FROM apps WHERE client_key = ?")
            .bind(client_key.expose())
            .execute(&mut *transaction)
            .await
            .map_err(query_error("remove an app"))?
            .rows_affected();
        transaction
            .commit()
            .await
            .map_err(query_error("commit remove_app"))?;
        Ok((removed > 0).then_some(merchants))
    }

    pub async fn list_apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.client_key, a.client_secret, a.source,
                    (SELECT COUNT(*) FROM merchants m WHERE m.client_key = a.client_key)
             FROM apps a ORDER BY a.client_key",
        )
        .fetch(&self.pool);
        collect_rows(rows, "list apps", |row| {
            let client_key = parse_client_key(row.get(0))?;
            let secret = self
                .master_key
                .open(&secret_binding(&client_key), row.get(1))?;
            Ok(AppRecord {
                client_secret: ClientSecret::parse(&secret)
                    .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                client_key,
                source: Source::parse(row.get(2))?,
                merchant_count: row.get(3),
            })
        })
        .await
    }

    // === merchants ===

    /// Adds a merchant or moves it to another app. Returns true when it is new,
    /// or None when the app does not exist.
    pub async fn put_merchant(
        &self,
        account_id: &AccountId,
        client_key: &ClientKey,
        source: Source,
        now_ms: i64,
    ) -> Result<Option<bool>, StoreError> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin put_merchant"))?;
        let app_exists = sqlx::query("SELECT 1 FROM apps WHERE client_key = ?")
            .bind(client_key.expose())
            .fetch_optional(&mut *transaction)
            .await
            .map_err(query_error("look up an app"))?
            .is_some();
        if !app_exists {
            return Ok(None);
        }
        let existed = sqlx::query("SELECT 1 FROM merchants WHERE account_id = ?")
            .bind(account_id.as_str())
            .fetch_optional(&mut *transaction)
            .await
            .map_err(query_error("look up a merchant"))?
            .is_some();
        sqlx::query(
            "INSERT INTO merchants (account_id, client_key, source, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (account_id) DO UPDATE
             SET client_key = excluded.client_key, source = excluded.source",
        )
        .bind(account_id.as_str())
        .bind(client_key.expose())
        .bind(source.as_str())
        .bind(now_ms)
        .execute(&mut *transaction)
        .await
        .map_err(query_error("store a merchant"))?;
        transaction
            .commit()
            .await
            .map_err(query_error("commit put_merchant"))?;
        Ok(Some(!existed))
    }

    pub async fn remove_merchant(&self, account_id: &AccountId) -> Result<bool, StoreError> {
        let removed = sqlx::query("DELETE FROM merchants WHERE account_id = ?")
            .bind(account_id.as_str())
            .execute(&self.pool)
            .await
            .map_err(query_error("remove a merchant"))?
            .rows_affected();
        Ok(removed > 0)
    }

    pub async fn list_merchants(&self) -> Result<Vec<MerchantRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT account_id, client_key, source FROM merchants ORDER BY account_id")
                .fetch(&self.pool);
        collect_rows(rows, "list merchants", |row| {
            Ok(MerchantRecord {
                account_id: AccountId::parse(row.get(0))
                    .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                client_key: parse_client_key(row.get(1))?,
                source: Source::parse(row.get(2))?,
            })
        })
        .await
    }

    /// Makes the config-sourced apps and merchants exactly those given, in one
    /// transaction: adds and updates them, and removes config-sourced entries the
    /// file no longer declares. Admin-sourced entries are left alone.
    pub async fn sync_config(
        &self,
        apps: &[(ClientKey, ClientSecret)],
        merchants: &[(AccountId, ClientKey)],
        clients: &[ClientRecord],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin config sync"))?;
        for client in clients {
            sqlx::query(
                "INSERT INTO clients (name, key_sha256, scopes, apps, merchants, source, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'config', ?6)
                 ON CONFLICT (name) DO UPDATE
                 SET key_sha256 = excluded.key_sha256, scopes = excluded.scopes, apps = excluded.apps,
                     merchants = excluded.merchants, source = 'config'",
            )
            .bind(&client.name)
            .bind(&client.key_sha256)
            .bind(json_list(&client.scopes))
            .bind(client.apps.as_deref().map(json_list))
            .bind(client.merchants.as_deref().map(json_list))
            .bind(now_ms)
            .execute(&mut *transaction)
            .await
            .map_err(query_error("sync a configured client"))?;
        }
        let configured_clients: Vec<&str> =
            clients.iter().map(|client| client.name.as_str()).collect();
        sqlx::query(
            "DELETE FROM clients WHERE source = 'config'
             AND name NOT IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(&configured_clients).unwrap_or_default())
        .execute(&mut *transaction)
        .await
        .map_err(query_error("remove clients no longer configured"))?;
        for (client_key, client_secret) in apps {
            sqlx::query(
                "INSERT INTO apps (client_key, client_secret, source, created_at, updated_at)
                 VALUES (?1, ?2, 'config', ?3, ?3)
                 ON CONFLICT (client_key) DO UPDATE
                 SET source = 'config', updated_at = excluded.updated_at,
                     client_secret = excluded.client_secret",
            )
            .bind(client_key.expose())
            .bind(
                self.master_key
                    .seal(&secret_binding(client_key), client_secret.expose()),
            )
            .bind(now_ms)
            .execute(&mut *transaction)
            .await
            .map_err(query_error("sync a configured app"))?;
            sqlx::query(
                "INSERT INTO tokens (client_key) VALUES (?1) ON CONFLICT (client_key) DO NOTHING",
            )
            .bind(client_key.expose())
            .execute(&mut *transaction)
            .await
            .map_err(query_error("prepare a configured app's token row"))?;
        }
        let configured_keys: Vec<&str> = apps.iter().map(|(key, _)| key.expose()).collect();
        let configured_keys = serde_json::to_string(&configured_keys).unwrap_or_default();
        sqlx::query(
            "DELETE FROM apps WHERE source = 'config'
             AND client_key NOT IN (SELECT value FROM json_each(?1))",
        )
        .bind(&configured_keys)
        .execute(&mut *transaction)
        .await
        .map_err(query_error("remove apps no longer configured"))?;
        for (account_id, client_key) in merchants {
            sqlx::query(
                "INSERT INTO merchants (account_id, client_key, source, created_at)
                 VALUES (?1, ?2, 'config', ?3)
                 ON CONFLICT (account_id) DO UPDATE
                 SET client_key = excluded.client_key, source = 'config'",
            )
            .bind(account_id.as_str())
            .bind(client_key.expose())
            .bind(now_ms)
            .execute(&mut *transaction)
            .await
            .map_err(query_error("sync a configured merchant"))?;
        }
        let configured_accounts: Vec<&str> = merchants
            .iter()
            .map(|(account, _)| account.as_str())
            .collect();
        let configured_accounts = serde_json::to_string(&configured_accounts).unwrap_or_default();
        sqlx::query(
            "DELETE FROM merchants WHERE source = 'config'
             AND account_id NOT IN (SELECT value FROM json_each(?1))",
        )
        .bind(&configured_accounts)
        .execute(&mut *transaction)
        .await
        .map_err(query_error("remove merchants no longer configured"))?;
        transaction
            .commit()
            .await
            .map_err(query_error("commit config sync"))?;
        Ok(())
    }

    // === API clients ===

    /// Adds a client; returns false when one of that name exists already.
    pub async fn create_client(
        &self,
        client: &ClientRecord,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO clients (name, key_sha256, scopes, apps, merchants, source, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        )
        .bind(&client.name)
        .bind(&client.key_sha256)
        .bind(json_list(&client.scopes))
        .bind(client.apps.as_deref().map(json_list))
        .bind(client.merchants.as_deref().map(json_list))
        .bind(client.source.as_str())
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(query_error("store a client"))?
        .rows_affected();
        Ok(inserted > 0)
    }

    pub async fn remove_client(&self, name: &str) -> Result<bool, StoreError> {
        let removed = sqlx::query("DELETE FROM clients WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(query_error("remove a client"))?
            .rows_affected();
        Ok(removed > 0)
    }

    pub async fn list_clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, key_sha256, scopes, apps, merchants, source FROM clients ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("list clients"))?;
        rows.iter()
            .map(|row| {
                let apps: Option<String> = row.get(3);
                let merchants: Option<String> = row.get(4);
                Ok(ClientRecord {
                    name: row.get(0),
                    key_sha256: row.get(1),
                    scopes: parse_json_list(row.get(2))?,
                    apps: apps.as_deref().map(parse_json_list).transpose()?,
                    merchants: merchants.as_deref().map(parse_json_list).transpose()?,
                    source: Source::parse(row.get(5))?,
                })
            })
            .collect()
    }

    // === audit ===

    /// Appends audit lines in one transaction.
    pub async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin audit append"))?;
        for record in records {
            sqlx::query(
                "INSERT INTO audit (at, client, action, app, reason, token_fingerprint, count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .bind(record.at_ms)
            .bind(&record.client)
            .bind(&record.action)
            .bind(&record.app)
            .bind(&record.reason)
            .bind(&record.token_fingerprint)
            .bind(record.count)
            .execute(&mut *transaction)
            .await
            .map_err(query_error("append to the audit trail"))?;
        }
        transaction
            .commit()
            .await
            .map_err(query_error("commit audit append"))?;
        Ok(())
    }

    /// The newest audit lines at or after `since_ms`, newest first.
    pub async fn list_audit(
        &self,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, client, action, app, reason, token_fingerprint, count FROM audit
             WHERE at >= ?1 ORDER BY at DESC, id DESC LIMIT ?2",
        )
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("list the audit trail"))?;
        Ok(rows
            .iter()
            .map(|row| AuditRecord {
                at_ms: row.get(0),
                client: row.get(1),
                action: row.get(2),
                app: row.get(3),
                reason: row.get(4),
                token_fingerprint: row.get(5),
                count: row.get(6),
            })
            .collect())
    }

    /// Deletes audit lines older than `before_ms`; returns how many.
    pub async fn prune_audit(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM audit WHERE at < ?")
            .bind(before_ms)
            .execute(&self.pool)
            .await
            .map_err(query_error("prune the audit trail"))?
            .rows_affected())
    }

    // === tokens ===

    /// Every app's token row (apps without one get an empty record).
    pub async fn load_tokens(&self) -> Result<Vec<(ClientKey, TokenRecord)>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.client_key, t.access_token, COALESCE(t.generation, 0), t.fetched_at, t.expires_at,
                    t.invalidated_at, t.last_error, t.last_error_at,
                    COALESCE(t.last_error_permanent, 0), COALESCE(t.consecutive_failures, 0)
             FROM apps a LEFT JOIN tokens t ON t.client_key = a.client_key",
        )
        .fetch(&self.pool);
        collect_rows(rows, "load tokens", |row| {
            let client_key = parse_client_key(row.get(0))?;
            let sealed_token: Option<String> = row.get(1);
            let access_token = match sealed_token {
                Some(sealed) => Some(AccessToken::new(
                    self.master_key.open(&token_binding(&client_key), &sealed)?,
                )),
                None => None,
            };
            Ok((
                client_key,
                TokenRecord {
                    access_token,
                    generation: row.get(2),
                    fetched_at_ms: row.get(3),
                    expires_at_ms: row.get(4),
                    invalidated_at_ms: row.get(5),
                    last_error: row.get(6),
                    last_error_at_ms: row.get(7),
                    last_error_permanent: row.get::<i64, _>(8) != 0,
                    consecutive_failures: row.get(9),
                },
            ))
        })
        .await
    }

    /// Commits a fetched token (and clears the error state) in one statement.
    pub async fn save_fetched_token(&self, token: &NewToken<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tokens (client_key, access_token, generation, fetched_at, expires_at,
                                 invalidated_at, last_error, last_error_at, last_error_permanent,
                                 consecutive_failures)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, NULL, NULL, 0, 0)
             ON CONFLICT (client_key) DO UPDATE
             SET access_token = excluded.access_token, generation = excluded.generation,
                 fetched_at = excluded.fetched_at, expires_at = excluded.expires_at,
                 invalidated_at = NULL, last_error = NULL, last_error_at = NULL,
                 last_error_permanent = 0, consecutive_failures = 0",
        )
        .bind(token.client_key.expose())
        .bind(self.master_key.seal(
            &token_binding(token.client_key),
            token.access_token.expose(),
        ))
        .bind(token.generation)
        .bind(token.fetched_at_ms)
        .bind(token.expires_at_ms)
        .execute(&self.pool)
        .await
        .map_err(query_error("save a fetched token"))?;
        Ok(())
    }

    pub async fn record_fetch_failure(&self, failure: &FetchFailure<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE tokens SET last_error = ?2, last_error_at = ?3, last_error_permanent = ?4,
                               consecutive_failures = ?5
             WHERE client_key = ?1",
        )
        .bind(failure.client_key.expose())
        .bind(failure.message)
        .bind(failure.at_ms)
        .bind(i64::from(failure.permanent))
        .bind(failure.consecutive_failures)
        .execute(&self.pool)
        .await
        .map_err(query_error("record a fetch failure"))?;
        Ok(())
    }

    /// Marks the app's token dead if it is still the given generation, so that
    /// a restart never loads a token Douyin has rejected.
    pub async fn mark_invalidated(
        &self,
        client_key: &ClientKey,
        generation: i64,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let changed = sqlx::query(
            "UPDATE tokens SET invalidated_at = ?3
             WHERE client_key = ?1 AND generation = ?2 AND invalidated_at IS NULL",
        )
        .bind(client_key.expose())
        .bind(generation)
        .bind(at_ms)
        .execute(&self.pool)
        .await
        .map_err(query_error("invalidate a token"))?
        .rows_affected();
        Ok(changed > 0)
    }
}

/// Converts rows one at a time as SQLite yields them. `fetch_all` would hold
/// every row's copied values at once: with 100,000 merchants that was a
/// 45 MB peak at start-up which the allocator kept resident afterwards.
async fn collect_rows<T>(
    mut rows: impl futures::Stream<Item = Result<SqliteRow, sqlx::Error>> + Unpin,
    operation: &'static str,
    convert: impl Fn(&SqliteRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut converted = Vec::new();
    while let Some(row) = rows.try_next().await.map_err(query_error(operation))? {
        converted.push(convert(&row)?);
    }
    Ok(converted)
}

/// Seals whatever plaintext an unsealed database holds and records the key check, in one transaction.
async fn seal_for_the_first_time(
    pool: &SqlitePool,
    master_key: &MasterKey,
) -> Result<(), StoreError> {
    let mut transaction = pool.begin().await.map_err(query_error("begin sealing"))?;
    reseal_every_value(&mut transaction, |binding, plaintext| {
        Ok(master_key.seal(binding, plaintext))
    })
    .await?;
    record_key_check(&mut transaction, master_key).await?;
    transaction
        .commit()
        .await
        .map_err(query_error("commit sealing"))?;
    Ok(())
}

/// A column of sealed values, each bound to its row's client key.
struct SealedColumn {
    /// Every row's client key and stored value, skipping NULL values.
    read: &'static str,
    /// Replaces one row's value: ?1 is the client key, ?2 the new value.
    write: &'static str,
    binding: fn(&ClientKey) -> String,
}

/// Every column that holds sealed values; the one list sealing and rotation walk.
const SEALED_COLUMNS: [SealedColumn; 2] = [
    SealedColumn {
        read: "SELECT client_key, client_secret FROM apps",
        write: "UPDATE apps SET client_secret = ?2 WHERE client_key = ?1",
        binding: secret_binding,
    },
    SealedColumn {
        read: "SELECT client_key, access_token FROM tokens WHERE access_token IS NOT NULL",
        write: "UPDATE tokens SET access_token = ?2 WHERE client_key = ?1",
        binding: token_binding,
    },
];

/// Rewrites every sealed value (app secrets and tokens): `reseal` gets the
/// value's binding and stored text and returns the text to store. First
/// sealing and key rotation differ only in `reseal`, so they share this one
/// loop and cannot disagree about which values are sealed. Returns how many
/// values were rewritten.
async fn reseal_every_value(
    connection: &mut SqliteConnection,
    reseal: impl Fn(&str, &str) -> Result<String, StoreError>,
) -> Result<usize, StoreError> {
    let mut resealed = 0;
    for column in &SEALED_COLUMNS {
        let rows: Vec<(String, String)> = sqlx::query_as(column.read)
            .fetch_all(&mut *connection)
            .await
            .map_err(query_error("read sealed values"))?;
        for (client_key, stored) in rows {
            let client_key = parse_client_key(&client_key)?;
            let binding = (column.binding)(&client_key);
            sqlx::query(column.write)
                .bind(client_key.expose())
                .bind(reseal(&binding, &stored)?)
                .execute(&mut *connection)
                .await
                .map_err(query_error("re-seal a value"))?;
            resealed += 1;
        }
    }
    Ok(resealed)
}

/// Records (or replaces) the key check sealed with `master_key`.
async fn record_key_check(
    connection: &mut SqliteConnection,
    master_key: &MasterKey,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO meta (name, value) VALUES ('key_check', ?1)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )
    .bind(master_key.seal(KEY_CHECK_BINDING, KEY_CHECK_PLAINTEXT))
    .execute(connection)
    .await
    .map_err(query_error("record the key check"))?;
    Ok(())
}

/// The sealed key check, or None for a database without one: new (no `meta`
/// table yet, since no migration ran) or sealed by no key so far. Read before
/// any migration, so it must not assume the schema.
async fn read_key_check(pool: &SqlitePool) -> Result<Option<String>, StoreError> {
    let meta_exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
    )
    .fetch_one(pool)
    .await
    .map_err(query_error("look for the meta table"))?;
    if !meta_exists {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT value FROM meta WHERE name = 'key_check'")
        .fetch_optional(pool)
        .await
        .map_err(query_error("read the key check"))
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

fn parse_json_list(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("a stored list is not JSON: {error}")))
}

fn parse_client_key(text: &str) -> Result<ClientKey, StoreError> {
    ClientKey::parse(text).map_err(|error| StoreError::Corrupt(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn temporary_store() -> (tempfile::TempDir, Store) {
        let directory = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(
            &directory.path().join("test.db"),
            &directory.path().join("master.key"),
        )
        .await
        .unwrap();
        (directory, store)
    }

    fn key(text: &str) -> ClientKey {
        ClientKey::parse(text).unwrap()
    }

    #[tokio::test]
    async fn a_saved_token_survives_reopening_and_invalidation_compares_generations() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("test.db");
        let key_file = directory.path().join("master.key");
        let (store, outcome) = Store::open(&path, &key_file).await.unwrap();
        assert_eq!(outcome, MasterKeyOutcome::Created(key_file.clone()));
        let app = key("app-one");
        store
            .put_app(
                &app,
                &ClientSecret::parse("secret").unwrap(),
                Source::Admin,
                1,
            )
            .await
            .unwrap();
        let token = AccessToken::new("clt.one".to_owned());
        store
            .save_fetched_token(&NewToken {
                client_key: &app,
                access_token: &token,
                generation: 3,
                fetched_at_ms: 1_000,
                expires_at_ms: 7_201_000,
            })
            .await
            .unwrap();
        store.close().await;

        let (store, outcome) = Store::open(&path, &key_file).await.unwrap();
        assert_eq!(outcome, MasterKeyOutcome::Loaded);
        let tokens = store.load_tokens().await.unwrap();
        assert_eq!(tokens.len(), 1);
        let record = &tokens[0].1;
        assert_eq!(record.access_token.as_ref().unwrap().expose(), "clt.one");
        assert_eq!(
            (record.generation, record.expires_at_ms),
            (3, Some(7_201_000))
        );
        assert!(
            !store.mark_invalidated(&app, 2, 5).await.unwrap(),
            "stale generation must not invalidate"
        );
        assert!(store.mark_invalidated(&app, 3, 5).await.unwrap());
        assert_eq!(
            store.load_tokens().await.unwrap()[0].1.invalidated_at_ms,
            Some(5)
        );
    }

    /// The embedded migrations plus one more, as the next release would bring.
    fn migrations_with_one_pending() -> Migrator {
        use sqlx::SqlSafeStr;
        use sqlx::migrate::{Migration, MigrationType};
        let mut migrations: Vec<Migration> = MIGRATIONS.iter().cloned().collect();
        let next_version = migrations.last().unwrap().version + 1;
        migrations.push(Migration::new(
            next_version,
            "pending".into(),
            MigrationType::Simple,
            "CREATE TABLE pending_probe (id INTEGER PRIMARY KEY) STRICT".into_sql_str(),
            false,
        ));
        Migrator::with_migrations(migrations)
    }

    /// The newest applied migration, read without the store (and without writing).
    async fn schema_version(path: &Path) -> i64 {
        use sqlx::Connection;
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .unwrap()
            .read_only(true);
        let mut connection = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        let version = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&mut connection)
            .await
            .unwrap();
        connection.close().await.unwrap();
        version
    }

    #[tokio::test]
    async fn a_wrong_or_missing_key_with_a_migration_pending_changes_nothing() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("test.db");
        let key_file = directory.path().join("master.key");
        let (store, _) = Store::open(&path, &key_file).await.unwrap();
        store
            .put_app(
                &key("app-one"),
                &ClientSecret::parse("s").unwrap(),
                Source::Admin,
                1,
            )
            .await
            .unwrap();
        store.close().await;
        let current_version = MIGRATIONS.iter().last().unwrap().version;
        assert_eq!(schema_version(&path).await, current_version);
        let bytes_before = std::fs::read(&path).unwrap();
        let pending = migrations_with_one_pending();

        let wrong_key_file = directory.path().join("wrong.key");
        MasterKey::generate().write_new(&wrong_key_file).unwrap();
        let error = Store::open_with_migrations(&path, &wrong_key_file, &pending)
            .await
            .err()
            .expect("a wrong key must be refused");
        assert!(
            matches!(error, StoreError::MasterKeyMismatch { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("nothing was changed"), "{error}");
        assert_eq!(schema_version(&path).await, current_version);
        assert!(
            std::fs::read(&path).unwrap() == bytes_before,
            "the database file changed"
        );

        let missing_key_file = directory.path().join("missing.key");
        let error = Store::open_with_migrations(&path, &missing_key_file, &pending)
            .await
            .err()
            .expect("a missing key must be refused");
        assert!(
            matches!(error, StoreError::MasterKeyMissing { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("nothing was changed"), "{error}");
        assert!(
            !missing_key_file.exists(),
            "no key is made up for an existing database"
        );
        assert_eq!(schema_version(&path).await, current_version);
        assert!(
            std::fs::read(&path).unwrap() == bytes_before,
            "the database file changed"
        );

        // The migration was really pending: the right key applies it.
        let (store, outcome) = Store::open_with_migrations(&path, &key_file, &pending)
            .await
            .unwrap();
        assert_eq!(outcome, MasterKeyOutcome::Loaded);
        store.close().await;
        assert_eq!(schema_version(&path).await, current_version + 1);
    }

    #[tokio::test]
    async fn config_sync_replaces_config_entries_and_keeps_admin_ones() {
        let (_directory, store) = temporary_store().await;
        let secret = ClientSecret::parse("s").unwrap();
        store
            .put_app(&key("admin-app"), &secret, Source::Admin, 1)
            .await
            .unwrap();
        let account = |text: &str| AccountId::parse(text).unwrap();
        store
            .sync_config(
                &[
                    (key("cfg-a"), secret.clone()),
                    (key("cfg-b"), secret.clone()),
                ],
                &[(account("1"), key("cfg-a")), (account("2"), key("cfg-b"))],
                &[],
                2,
            )
            .await
            .unwrap();
        store
            .sync_config(
                &[(key("cfg-a"), secret.clone())],
                &[(account("1"), key("cfg-a"))],
                &[],
                3,
            )
            .await
            .unwrap();
        let apps: Vec<String> = store
            .list_apps()
            .await
            .unwrap()
            .iter()
            .map(|app| app.client_key.expose().to_owned())
            .collect();
        assert_eq!(apps, ["admin-app", "cfg-a"]);
        let merchants = store.list_merchants().await.unwrap();
        assert_eq!(merchants.len(), 1);
        assert_eq!(merchants[0].account_id.as_str(), "1");
        assert_eq!(
            store
                .put_merchant(&account("9"), &key("missing"), Source::Admin, 4)
                .await
                .unwrap(),
            None
        );
        assert_eq!(store.remove_app(&key("cfg-a")).await.unwrap(), Some(1));
        assert!(
            store.list_merchants().await.unwrap().is_empty(),
            "merchants go with their app"
        );
    }
}
