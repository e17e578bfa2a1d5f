//! The store: the only module that writes SQL. This file owns the `Store`
//! itself (the SQLite pool with WAL, busy timeout and foreign keys, the
//! one-owner lock file, the master key check, the embedded migrations, key
//! rotation, close); each table's queries live in a file of their own behind
//! one type (`store.apps()`, `store.merchants()`, `store.tokens()`,
//! `store.clients()`, `store.audit()`, `store.audit_decisions()`, `store.after_sale_events()`). Callers see records and plain
//! answers ("was it new", "how many went"), never rows, SQLite types or
//! SQLite's error codes, so a second backend can sit beside this one.

mod after_sale_events;
mod apps;
mod audit;
mod audit_decisions;
pub(crate) mod backend;
mod clients;
mod cluster;
mod merchants;
mod meta;
mod tokens;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use backend::{Backend, Pool, Transaction, on_backend};

use crate::domain::{AccountId, ClientKey, ClientSecret};
use crate::sealing::{MasterKey, SealError};

pub(crate) use after_sale_events::{
    AfterSaleEventRecord, AfterSaleEventTable, AfterSaleEventWriter, StoredAfterSaleEvent,
};
pub(crate) use apps::{AppRecord, AppTable};
pub(crate) use audit::{AuditRecord, AuditTable};
pub(crate) use audit_decisions::{
    AuditDecisionTable, DecisionAuthor, DecisionRecord, DecisionState,
};
pub(crate) use clients::{ClientRecord, ClientTable};
pub(crate) use cluster::{CLUSTER_CHANNEL, ClusterMessage, ClusterTable, FetchRequest, FetchTurn};
pub(crate) use merchants::{MerchantRecord, MerchantTable};
pub(crate) use tokens::{FetchFailure, TokenRecord};
pub use tokens::{NewToken, TokenTable};

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

impl StoreError {
    /// Whether this refusal is one a restart cannot cure, only a changed
    /// setting: a master key that does not open the database, or PostgreSQL
    /// refusing the login or naming no such database. `serve` and
    /// check-config exit 64 for these, so systemd stops restarting.
    pub fn needs_a_changed_setting(&self) -> bool {
        match self {
            Self::MasterKeyMissing { .. } | Self::MasterKeyMismatch { .. } => true,
            Self::Open {
                source: sqlx::Error::Database(error),
                ..
            } => {
                // invalid_authorization_specification, invalid_password,
                // invalid_catalog_name (no such database).
                matches!(error.code().as_deref(), Some("28000" | "28P01" | "3D000"))
            }
            _ => false,
        }
    }
}

/// The connection settings of `database`, its password (kept out of the URL)
/// added.
fn postgres_connect_options(database: &PostgresDatabase) -> Result<PgConnectOptions, StoreError> {
    let mut options = PgConnectOptions::from_str(&database.url)
        .map_err(|source| StoreError::Open {
            path: database.url.clone(),
            source,
        })?
        .application_name("douyin-tokend");
    if let Some(password) = &database.password {
        options = options.password(password);
    }
    Ok(options)
}

/// What opening the store did about the master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeyOutcome {
    /// The key file existed and opens the database.
    Loaded,
    /// A new database: a new key was written to this file.
    Created(PathBuf),
}

/// The embedded migrations, one set per engine; `open` runs them once the
/// master key is proven.
static MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Where the daemon keeps its state.
#[derive(Clone)]
pub enum DatabaseLocation {
    /// A SQLite file: one daemon owns it (the lock file beside it says so).
    Sqlite(PathBuf),
    /// A PostgreSQL database any number of daemons share.
    Postgres(PostgresDatabase),
}

impl std::fmt::Display for DatabaseLocation {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(formatter, "{}", path.display()),
            Self::Postgres(database) => formatter.write_str(&database.url),
        }
    }
}

/// A PostgreSQL database: its URL (which holds no password) and the password
/// read from a file. `Debug` leaves the password out.
#[derive(Clone)]
pub struct PostgresDatabase {
    pub url: String,
    pub password: Option<String>,
}

impl std::fmt::Debug for PostgresDatabase {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PostgresDatabase")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The advisory lock held while one daemon checks the master key, migrates
/// and seals a PostgreSQL database, so two starting at once cannot both make
/// up a key for a new database.
const POSTGRES_OPEN_LOCK: i64 = 0x646f_7579_696e_0000;

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
    pub(crate) fn as_str(self) -> &'static str {
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

/// The daemon's database. Cheap to clone: clones share the pool, the master key
/// and the ownership of the database.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    master_key: Arc<MasterKey>,
    /// An exclusive lock on `<database>.lock`, held until `close`: one owner per token store.
    owner_lock: Arc<parking_lot::Mutex<Option<std::fs::File>>>,
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
        let pool = Backend::Sqlite(pool);
        match Self::check_key_and_migrate(&pool, master_key_file, &database, migrations).await {
            Ok((master_key, outcome)) => Ok((
                Self {
                    pool,
                    master_key: Arc::new(master_key),
                    owner_lock: Arc::new(parking_lot::Mutex::new(Some(owner_lock))),
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

    /// Opens the store at `location` (see `open` and `open_postgres`).
    pub async fn open_location(
        location: &DatabaseLocation,
        master_key_file: &Path,
    ) -> Result<(Self, MasterKeyOutcome), StoreError> {
        match location {
            DatabaseLocation::Sqlite(path) => Self::open(path, master_key_file).await,
            DatabaseLocation::Postgres(database) => {
                Self::open_postgres(database, master_key_file).await
            }
        }
    }

    /// Opens a PostgreSQL database that other daemons may share: the master
    /// key is checked, the migrations run and a new database is sealed while
    /// this daemon holds an advisory lock, so daemons starting together take
    /// turns and all end up with the key of the first.
    pub async fn open_postgres(
        database: &PostgresDatabase,
        master_key_file: &Path,
    ) -> Result<(Self, MasterKeyOutcome), StoreError> {
        let open_error = |source| StoreError::Open {
            path: database.url.clone(),
            source,
        };
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(postgres_connect_options(database)?)
            .await
            .map_err(open_error)?;
        let mut lock_holder = pool.acquire().await.map_err(open_error)?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(POSTGRES_OPEN_LOCK)
            .execute(&mut *lock_holder)
            .await
            .map_err(open_error)?;
        let pool = Backend::Postgres(pool);
        let checked = Self::check_key_and_migrate(
            &pool,
            master_key_file,
            &database.url,
            &POSTGRES_MIGRATIONS,
        )
        .await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(POSTGRES_OPEN_LOCK)
            .execute(&mut *lock_holder)
            .await;
        drop(lock_holder);
        match (checked, unlocked) {
            (Ok((master_key, outcome)), Ok(_)) => Ok((
                Self {
                    pool,
                    master_key: Arc::new(master_key),
                    owner_lock: Arc::new(parking_lot::Mutex::new(None)),
                },
                outcome,
            )),
            (Err(error), _) => {
                pool.close().await;
                Err(error)
            }
            (Ok(_), Err(source)) => {
                pool.close().await;
                Err(open_error(source))
            }
        }
    }

    /// Whether the store is a PostgreSQL database several daemons may share.
    pub fn is_shared(&self) -> bool {
        self.pool.is_postgres()
    }

    /// The PostgreSQL pool, for the cluster's listener; None on SQLite.
    pub(crate) fn postgres_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.pool {
            Backend::Postgres(pool) => Some(pool),
            Backend::Sqlite(_) => None,
        }
    }

    /// Tells the other daemons sharing the database that apps, merchants or
    /// clients changed (nothing on SQLite). A failure is logged, not
    /// returned: the write is done, and the others re-read everything when
    /// their link to the database comes back.
    async fn announce_registry_change(&self) {
        if let Some(cluster) = self.cluster()
            && let Err(error) = cluster.announce(&ClusterMessage::Registry).await
        {
            tracing::warn!(%error, "cannot tell the other daemons about a registry change");
        }
    }

    /// What daemons sharing the database agree on; None on SQLite (one owner).
    pub(crate) fn cluster(&self) -> Option<ClusterTable<'_>> {
        Some(ClusterTable {
            store: self,
            pool: self.postgres_pool()?,
        })
    }

    /// Proves the master key against `meta.key_check` before the migrations
    /// run, so a wrong or missing key leaves the database as it was (a
    /// migration is a write). A database without a key check (new, or from
    /// before sealing) gets one, after its migrations, under a new or the
    /// given key.
    async fn check_key_and_migrate(
        pool: &Pool,
        master_key_file: &Path,
        database: &str,
        migrations: &Migrator,
    ) -> Result<(MasterKey, MasterKeyOutcome), StoreError> {
        let (sealed, existing_key) =
            Self::prove_master_key(pool, master_key_file, database).await?;
        on_backend!(pool, pool => migrations.run(pool).await)?;
        let (master_key, outcome) = match existing_key {
            Some(key) => (key, MasterKeyOutcome::Loaded),
            None => {
                let key = MasterKey::generate();
                key.write_new(master_key_file)?;
                (key, MasterKeyOutcome::Created(master_key_file.to_owned()))
            }
        };
        if !sealed {
            seal_for_the_first_time(pool, &master_key).await?;
        }
        Ok((master_key, outcome))
    }

    /// Reads the database's key check and proves the key file against it,
    /// writing nothing: whether the database is sealed yet, and the key file's
    /// key when there is one.
    async fn prove_master_key(
        pool: &Pool,
        master_key_file: &Path,
        database: &str,
    ) -> Result<(bool, Option<MasterKey>), StoreError> {
        let key_check = meta::read_key_check(pool).await?;
        let key_path = master_key_file.display().to_string();
        let database = database.to_owned();
        let existing_key = match (&key_check, master_key_file.exists()) {
            (Some(_), false) => return Err(StoreError::MasterKeyMissing { key_path, database }),
            (_, true) => Some(MasterKey::read(master_key_file)?),
            (None, false) => None,
        };
        if let (Some(sealed), Some(key)) = (&key_check, &existing_key)
            && !meta::key_check_opens_with(sealed, key)
        {
            return Err(StoreError::MasterKeyMismatch { key_path, database });
        }
        Ok((key_check.is_some(), existing_key))
    }

    /// check-config's look at a PostgreSQL database: logs in (with one
    /// connection, for at most 5 s) and proves the master key file against a
    /// database that was sealed. Reads only: a new database stays untouched
    /// until `serve` migrates it.
    pub async fn check_postgres(
        database: &PostgresDatabase,
        master_key_file: &Path,
    ) -> Result<(), StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(postgres_connect_options(database)?)
            .await
            .map_err(|source| StoreError::Open {
                path: database.url.clone(),
                source,
            })?;
        let pool = Backend::Postgres(pool);
        let proven = Self::prove_master_key(&pool, master_key_file, &database.url).await;
        pool.close().await;
        proven.map(|_| ())
    }

    /// Re-seals every secret and token under `new_key` in one transaction.
    /// Returns how many values were re-sealed. The caller then replaces the key file.
    pub(crate) async fn rotate_master_key(
        &mut self,
        new_key: MasterKey,
    ) -> Result<usize, StoreError> {
        let mut transaction = self.pool.begin("begin key rotation").await?;
        let old_key = &self.master_key;
        let resealed = reseal_every_value(&mut transaction, |binding, sealed| {
            Ok(new_key.seal(binding, &old_key.open(binding, sealed)?))
        })
        .await?;
        meta::record_key_check(&mut transaction, &new_key).await?;
        transaction.commit("commit key rotation").await?;
        self.master_key = Arc::new(new_key);
        Ok(resealed)
    }

    /// Closes the pool and gives up ownership of the database.
    pub async fn close(&self) {
        self.pool.close().await;
        let lock = self.owner_lock.lock().take();
        drop(lock);
    }

    /// The apps and their sealed secrets.
    pub fn apps(&self) -> AppTable<'_> {
        AppTable { store: self }
    }

    /// Which app serves each merchant.
    pub(crate) fn merchants(&self) -> MerchantTable<'_> {
        MerchantTable { store: self }
    }

    /// Each app's current token and fetch state.
    pub fn tokens(&self) -> TokenTable<'_> {
        TokenTable { store: self }
    }

    /// The API clients allowed to call the daemon.
    pub(crate) fn clients(&self) -> ClientTable<'_> {
        ClientTable { store: self }
    }

    /// The audit trail.
    pub(crate) fn audit(&self) -> AuditTable<'_> {
        AuditTable { store: self }
    }

    pub(crate) fn audit_decisions(&self) -> AuditDecisionTable<'_> {
        AuditDecisionTable { store: self }
    }

    /// The refund-request notifications the webhook stored.
    pub(crate) fn after_sale_events(&self) -> AfterSaleEventTable<'_> {
        AfterSaleEventTable { store: self }
    }

    /// Makes the config-sourced clients, apps and merchants exactly those
    /// given, in one transaction across the three tables: adds and updates
    /// them, and removes config-sourced entries the file no longer declares.
    /// Admin-sourced entries are left alone.
    pub(crate) async fn sync_config(
        &self,
        apps: &[(ClientKey, ClientSecret)],
        merchants: &[(AccountId, ClientKey)],
        clients: &[ClientRecord],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut transaction = self.pool.begin("begin config sync").await?;
        clients::replace_configured(&mut transaction, clients, now_ms).await?;
        apps::replace_configured(&mut transaction, &self.master_key, apps, now_ms).await?;
        merchants::replace_configured(&mut transaction, merchants, now_ms).await?;
        transaction.commit("commit config sync").await?;
        self.announce_registry_change().await;
        Ok(())
    }
}

/// Converts rows one at a time as SQLite yields them. `fetch_all` would hold
/// every row's copied values at once: with 100,000 merchants that was a
/// 45 MB peak at start-up which the allocator kept resident afterwards.
async fn collect_rows<Row, T>(
    mut rows: impl futures::Stream<Item = Result<Row, sqlx::Error>> + Unpin,
    operation: &'static str,
    convert: impl Fn(Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut converted = Vec::new();
    while let Some(row) = rows.try_next().await.map_err(query_error(operation))? {
        converted.push(convert(row)?);
    }
    Ok(converted)
}

/// Seals whatever plaintext an unsealed database holds and records the key check, in one transaction.
async fn seal_for_the_first_time(pool: &Pool, master_key: &MasterKey) -> Result<(), StoreError> {
    let mut transaction = pool.begin("begin sealing").await?;
    reseal_every_value(&mut transaction, |binding, plaintext| {
        Ok(master_key.seal(binding, plaintext))
    })
    .await?;
    meta::record_key_check(&mut transaction, master_key).await?;
    transaction.commit("commit sealing").await?;
    Ok(())
}

/// A column of sealed values, each bound to its row's client key. The table
/// that owns the column describes it (`apps::SEALED_SECRETS`, `tokens::SEALED_TOKENS`).
struct SealedColumn {
    /// Every row's client key and stored value, skipping NULL values.
    read: &'static str,
    /// Replaces one row's value: $1 is the client key, $2 the new value.
    write: &'static str,
    binding: fn(&ClientKey) -> String,
}

/// Every column that holds sealed values; the one list sealing and rotation walk.
const SEALED_COLUMNS: [SealedColumn; 2] = [apps::SEALED_SECRETS, tokens::SEALED_TOKENS];

/// Rewrites every sealed value (app secrets and tokens): `reseal` gets the
/// value's binding and stored text and returns the text to store. First
/// sealing and key rotation differ only in `reseal`, so they share this one
/// loop and cannot disagree about which values are sealed. Returns how many
/// values were rewritten.
async fn reseal_every_value(
    transaction: &mut Transaction,
    reseal: impl Fn(&str, &str) -> Result<String, StoreError>,
) -> Result<usize, StoreError> {
    let mut resealed = 0;
    for column in &SEALED_COLUMNS {
        let rows: Vec<(String, String)> =
            on_backend!(&mut *transaction, transaction => sqlx::query_as(column.read)
            .fetch_all(&mut **transaction)
            .await)
            .map_err(query_error("read sealed values"))?;
        for (client_key, stored) in rows {
            let client_key = parse_client_key(&client_key)?;
            let binding = (column.binding)(&client_key);
            let resealed_value = reseal(&binding, &stored)?;
            on_backend!(&mut *transaction, transaction => sqlx::query(column.write)
                .bind(client_key.expose())
                .bind(&resealed_value)
                .execute(&mut **transaction)
                .await
                .map(drop))
            .map_err(query_error("re-seal a value"))?;
            resealed += 1;
        }
    }
    Ok(resealed)
}

/// The keys (first column) a config-sourced query returns, inside the config
/// sync's transaction, so it can remove what the file no longer declares.
async fn config_sourced_keys(
    transaction: &mut Transaction,
    query: &'static str,
) -> Result<Vec<String>, StoreError> {
    on_backend!(transaction, transaction => sqlx::query_scalar(query)
        .fetch_all(&mut **transaction)
        .await)
    .map_err(query_error("list what the config file declared"))
}

fn parse_client_key(text: &str) -> Result<ClientKey, StoreError> {
    ClientKey::parse(text).map_err(|error| StoreError::Corrupt(error.to_string()))
}

/// A store on a new database in a directory of its own, for unit tests
/// (keep the directory as long as the store).
#[cfg(test)]
pub(crate) async fn temporary_store() -> (tempfile::TempDir, Store) {
    let directory = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(
        &directory.path().join("test.db"),
        &directory.path().join("master.key"),
    )
    .await
    .unwrap();
    (directory, store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AccessToken;

    fn key(text: &str) -> ClientKey {
        ClientKey::parse(text).unwrap()
    }

    /// The engines every store test that is not about one engine runs on.
    #[derive(Clone, Copy)]
    enum Engine {
        Sqlite,
        Postgres,
    }

    /// A new database on `engine` (a private PostgreSQL server for that
    /// one) and its key file; `open` opens it as a daemon would.
    struct TestDatabase {
        _postgres: Option<crate::bench::postgres_server::PostgresServer>,
        location: DatabaseLocation,
        key_file: PathBuf,
        _directory: tempfile::TempDir,
    }

    impl TestDatabase {
        async fn new(engine: Engine) -> Self {
            let directory = tempfile::tempdir().unwrap();
            let (postgres, location) = match engine {
                Engine::Sqlite => (
                    None,
                    DatabaseLocation::Sqlite(directory.path().join("test.db")),
                ),
                Engine::Postgres => {
                    let postgres = crate::bench::postgres_server::PostgresServer::start()
                        .await
                        .unwrap();
                    postgres.create_database("tokend").await.unwrap();
                    let location = DatabaseLocation::Postgres(PostgresDatabase {
                        url: postgres.url("tokend"),
                        password: None,
                    });
                    (Some(postgres), location)
                }
            };
            Self {
                _postgres: postgres,
                location,
                key_file: directory.path().join("master.key"),
                _directory: directory,
            }
        }

        async fn open(&self) -> (Store, MasterKeyOutcome) {
            Store::open_location(&self.location, &self.key_file)
                .await
                .unwrap()
        }
    }

    #[tokio::test]
    async fn a_saved_token_survives_reopening_and_invalidation_compares_generations() {
        a_saved_token_survives_reopening(Engine::Sqlite).await;
    }

    #[tokio::test]
    async fn on_postgres_a_saved_token_survives_reopening_and_invalidation_compares_generations() {
        a_saved_token_survives_reopening(Engine::Postgres).await;
    }

    async fn a_saved_token_survives_reopening(engine: Engine) {
        let database = TestDatabase::new(engine).await;
        let key_file = database.key_file.clone();
        let (store, outcome) = database.open().await;
        assert_eq!(outcome, MasterKeyOutcome::Created(key_file.clone()));
        let app = key("app-one");
        store
            .apps()
            .put(
                &app,
                &ClientSecret::parse("secret").unwrap(),
                Source::Admin,
                1,
            )
            .await
            .unwrap();
        let token = AccessToken::new("clt.one".to_owned());
        store
            .tokens()
            .save_fetched(&NewToken {
                client_key: &app,
                access_token: &token,
                generation: 3,
                fetched_at_ms: 1_000,
                expires_at_ms: 7_201_000,
            })
            .await
            .unwrap();
        store.close().await;

        let (store, outcome) = database.open().await;
        assert_eq!(outcome, MasterKeyOutcome::Loaded);
        let tokens = store.tokens().load_all().await.unwrap();
        assert_eq!(tokens.len(), 1);
        let record = &tokens[0].1;
        assert_eq!(record.access_token.as_ref().unwrap().expose(), "clt.one");
        assert_eq!(
            (record.generation, record.expires_at_ms),
            (3, Some(7_201_000))
        );
        assert!(
            !store.tokens().mark_invalidated(&app, 2, 5).await.unwrap(),
            "stale generation must not invalidate"
        );
        assert!(store.tokens().mark_invalidated(&app, 3, 5).await.unwrap());
        assert_eq!(
            store.tokens().load_all().await.unwrap()[0]
                .1
                .invalidated_at_ms,
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
            .apps()
            .put(
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
    async fn a_database_from_before_sealing_is_sealed_at_first_open() {
        use sqlx::Connection;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("test.db");
        let key_file = directory.path().join("master.key");
        let app = key("app-one");
        let (store, _) = Store::open(&path, &key_file).await.unwrap();
        store
            .apps()
            .put(
                &app,
                &ClientSecret::parse("secret").unwrap(),
                Source::Admin,
                1,
            )
            .await
            .unwrap();
        store.close().await;
        // Make it what a database from before sealing was: plaintext values, no key check, no key.
        let options =
            SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).unwrap();
        let mut connection = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        for statement in [
            "UPDATE apps SET client_secret = 'secret'",
            "UPDATE tokens SET access_token = 'clt.plain', generation = 1, fetched_at = 1, expires_at = 2",
            "DELETE FROM meta",
        ] {
            sqlx::query(statement)
                .execute(&mut connection)
                .await
                .unwrap();
        }
        connection.close().await.unwrap();
        std::fs::remove_file(&key_file).unwrap();

        let (store, outcome) = Store::open(&path, &key_file).await.unwrap();
        assert_eq!(outcome, MasterKeyOutcome::Created(key_file.clone()));
        assert_eq!(
            store.apps().list().await.unwrap()[0].client_secret.expose(),
            "secret"
        );
        let tokens = store.tokens().load_all().await.unwrap();
        assert_eq!(
            tokens[0].1.access_token.as_ref().unwrap().expose(),
            "clt.plain"
        );
        let stored: (String, String) = sqlx::query_as(
            "SELECT a.client_secret, t.access_token FROM apps a JOIN tokens t USING (client_key)",
        )
        .fetch_one(match &store.pool {
            Backend::Sqlite(pool) => pool,
            Backend::Postgres(_) => unreachable!("a SQLite test"),
        })
        .await
        .unwrap();
        assert!(
            stored.0.starts_with(crate::sealing::SEALED_PREFIX),
            "the secret is sealed"
        );
        assert!(
            stored.1.starts_with(crate::sealing::SEALED_PREFIX),
            "the token is sealed"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn config_sync_replaces_config_entries_and_keeps_admin_ones() {
        config_sync_replaces_config_entries(Engine::Sqlite).await;
    }

    #[tokio::test]
    async fn on_postgres_config_sync_replaces_config_entries_and_keeps_admin_ones() {
        config_sync_replaces_config_entries(Engine::Postgres).await;
    }

    async fn config_sync_replaces_config_entries(engine: Engine) {
        let database = TestDatabase::new(engine).await;
        let (store, _) = database.open().await;
        let secret = ClientSecret::parse("s").unwrap();
        store
            .apps()
            .put(&key("admin-app"), &secret, Source::Admin, 1)
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
            .apps()
            .list()
            .await
            .unwrap()
            .iter()
            .map(|app| app.client_key.expose().to_owned())
            .collect();
        assert_eq!(apps, ["admin-app", "cfg-a"]);
        let merchants = store.merchants().list().await.unwrap();
        assert_eq!(merchants.len(), 1);
        assert_eq!(merchants[0].account_id.as_str(), "1");
        assert_eq!(
            store
                .merchants()
                .put(&account("9"), &key("missing"), Source::Admin, 4)
                .await
                .unwrap(),
            None
        );
        assert_eq!(store.apps().remove(&key("cfg-a")).await.unwrap(), Some(1));
        assert!(
            store.merchants().list().await.unwrap().is_empty(),
            "merchants go with their app"
        );
    }
}
