//! The directory of apps, merchants and API clients: writes them to SQLite,
//! keeps the merchant → app map and the client list in memory for the request
//! path, and tells the token manager about apps that come, change or go. It
//! turns the config file's declarations into the store's records: `config`
//! knows nothing of the store.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::access::{ApiClient, Authenticator, KeyHash, Scope};
use crate::clock::SharedClock;
use crate::config::Declarations;
use crate::domain::{AccountId, ClientKey, ClientSecret};
use crate::store::{AppRecord, ClientRecord, MerchantRecord, Source, Store, StoreError};
use crate::token::TokenManager;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    #[error("{client_key} is not registered; add it first with `douyin-tokend app add`")]
    UnknownApp { client_key: ClientKey },
    #[error(
        "merchant {account_id} is not registered in the daemon; add it with `douyin-tokend merchant add`"
    )]
    UnknownMerchant { account_id: AccountId },
    #[error("a client named {name:?} exists already; remove it first or pick another name")]
    ClientExists { name: String },
    #[error("no client named {name:?}")]
    UnknownClient { name: String },
    #[error("{0}")]
    InvalidClient(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a configuration reload changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReloadReport {
    pub(crate) apps_added: usize,
    pub(crate) apps_removed: usize,
    pub(crate) merchants_added: usize,
    pub(crate) merchants_removed: usize,
}

#[derive(Clone)]
pub(crate) struct Registry {
    store: Store,
    tokens: TokenManager,
    clock: SharedClock,
    merchants: Arc<RwLock<HashMap<AccountId, ClientKey>>>,
    authenticator: Authenticator,
    /// Serializes writes, so that a reload's rebuild of the in-memory map
    /// cannot interleave with an AdminService write and lose it.
    writes: Arc<tokio::sync::Mutex<()>>,
}

impl Registry {
    /// Makes the database's config-sourced apps and merchants match the config
    /// file; runs before the token manager loads.
    pub(crate) async fn sync_config(
        store: &Store,
        declarations: &Declarations,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let apps: Vec<(ClientKey, ClientSecret)> = declarations
            .apps
            .iter()
            .map(|app| (app.client_key.clone(), app.client_secret.clone()))
            .collect();
        let merchants: Vec<(AccountId, ClientKey)> = declarations
            .merchants
            .iter()
            .map(|merchant| (merchant.account_id.clone(), merchant.client_key.clone()))
            .collect();
        let clients: Vec<ClientRecord> = declarations
            .clients
            .iter()
            .map(|client| client_record(client, Source::Config))
            .collect();
        store.sync_config(&apps, &merchants, &clients, now_ms).await
    }

    pub(crate) async fn load(
        store: Store,
        tokens: TokenManager,
        clock: SharedClock,
    ) -> Result<Self, StoreError> {
        let merchants = store
            .merchants()
            .list()
            .await?
            .into_iter()
            .map(|merchant| (merchant.account_id, merchant.client_key))
            .collect();
        let registry = Self {
            store,
            tokens,
            clock,
            merchants: Arc::new(RwLock::new(merchants)),
            authenticator: Authenticator::default(),
            writes: Arc::new(tokio::sync::Mutex::new(())),
        };
        registry.reload_clients().await?;
        Ok(registry)
    }

    /// Who may call the daemon, as the request path checks it.
    pub(crate) fn authenticator(&self) -> &Authenticator {
        &self.authenticator
    }

    async fn reload_clients(&self) -> Result<(), StoreError> {
        let clients = self
            .store
            .clients()
            .list()
            .await?
            .iter()
            .map(api_client_from_record)
            .collect::<Result<Vec<_>, _>>()?;
        if clients.is_empty() {
            tracing::warn!(
                "no API clients are configured: every call except health and reflection is refused; add [[clients]] to the config"
            );
        }
        self.authenticator.replace(clients);
        Ok(())
    }

    /// Creates an API client and returns its key; only the key's hash is stored.
    pub(crate) async fn create_client(
        &self,
        name: &str,
        scopes: &[String],
        apps: &[String],
        merchants: &[String],
    ) -> Result<String, RegistryError> {
        let _serialized = self.writes.lock().await;
        let api_key = crate::access::generate_api_key();
        let invalid = |message: String| RegistryError::InvalidClient(message);
        let scopes: BTreeSet<Scope> = scopes
            .iter()
            .map(|scope| Scope::parse(scope))
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        // An empty list over the wire means no bound, as an absent one does in the file.
        let apps: Option<BTreeSet<ClientKey>> = (!apps.is_empty())
            .then(|| apps.iter().map(|app| ClientKey::parse(app)).collect())
            .transpose()
            .map_err(|error| invalid(error.to_string()))?;
        let merchants: Option<BTreeSet<AccountId>> = (!merchants.is_empty())
            .then(|| {
                merchants
                    .iter()
                    .map(|merchant| AccountId::parse(merchant))
                    .collect()
            })
            .transpose()
            .map_err(|error| invalid(error.to_string()))?;
        let client = ApiClient::declare(name, KeyHash::of_key(&api_key), scopes, apps, merchants)
            .map_err(|error| invalid(error.to_string()))?;
        let record = client_record(&client, Source::Admin);
        if !self
            .store
            .clients()
            .create(&record, self.clock.now_unix_ms())
            .await?
        {
            return Err(RegistryError::ClientExists { name: record.name });
        }
        self.reload_clients().await?;
        tracing::info!(client = %record.name, scopes = ?record.scopes, "API client created");
        Ok(api_key)
    }

    pub(crate) async fn remove_client(&self, name: &str) -> Result<(), RegistryError> {
        let _serialized = self.writes.lock().await;
        if !self.store.clients().remove(name).await? {
            return Err(RegistryError::UnknownClient {
                name: name.to_owned(),
            });
        }
        self.reload_clients().await?;
        tracing::info!(client = %name, "API client removed");
        Ok(())
    }

    pub(crate) async fn list_clients(&self) -> Result<Vec<ClientRecord>, RegistryError> {
        Ok(self.store.clients().list().await?)
    }

    /// Applies a re-read config file (SIGHUP) to the running daemon: syncs the
    /// database as at start-up, tells the token manager about apps that came,
    /// went or changed secret (tokens of the others stay as they are), and
    /// rebuilds the merchant map from the database.
    pub(crate) async fn reload_config(
        &self,
        declarations: &Declarations,
    ) -> Result<ReloadReport, StoreError> {
        let _serialized = self.writes.lock().await;
        Self::sync_config(&self.store, declarations, self.clock.now_unix_ms()).await?;
        self.reload_clients().await?;
        let stored_apps = self.store.apps().list().await?;
        let stored_merchants: HashMap<AccountId, ClientKey> = self
            .store
            .merchants()
            .list()
            .await?
            .into_iter()
            .map(|merchant| (merchant.account_id, merchant.client_key))
            .collect();
        let held_apps: HashSet<ClientKey> = self
            .tokens
            .status()
            .into_iter()
            .map(|view| view.client_key)
            .collect();
        let stored_keys: HashSet<&ClientKey> =
            stored_apps.iter().map(|app| &app.client_key).collect();
        let mut report = ReloadReport::default();
        for app in &stored_apps {
            if !held_apps.contains(&app.client_key) {
                report.apps_added += 1;
            }
            // Unchanged secrets leave the app's token and state untouched.
            self.tokens
                .app_put(&app.client_key, app.client_secret.clone());
        }
        for client_key in &held_apps {
            if !stored_keys.contains(client_key) {
                report.apps_removed += 1;
                self.tokens.app_removed(client_key);
            }
        }
        let mut merchants_in_memory = self.merchants.write();
        report.merchants_added = stored_merchants
            .keys()
            .filter(|account_id| !merchants_in_memory.contains_key(*account_id))
            .count();
        report.merchants_removed = merchants_in_memory
            .keys()
            .filter(|account_id| !stored_merchants.contains_key(*account_id))
            .count();
        *merchants_in_memory = stored_merchants;
        drop(merchants_in_memory);
        Ok(report)
    }

    /// The app serving a merchant, from memory.
    pub(crate) fn app_for_merchant(
        &self,
        account_id: &AccountId,
    ) -> Result<ClientKey, RegistryError> {
        let merchants = self.merchants.read();
        merchants
            .get(account_id)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownMerchant {
                account_id: account_id.clone(),
            })
    }

    /// Adds an app or replaces its secret. Returns true when it is new.
    pub(crate) async fn put_app(
        &self,
        client_key: &ClientKey,
        client_secret: &ClientSecret,
    ) -> Result<bool, RegistryError> {
        let _serialized = self.writes.lock().await;
        let created = self
            .store
            .apps()
            .put(
                client_key,
                client_secret,
                Source::Admin,
                self.clock.now_unix_ms(),
            )
            .await?;
        self.tokens.app_put(client_key, client_secret.clone());
        tracing::info!(app = %client_key, created, "app stored");
        Ok(created)
    }

    /// Removes an app, its merchants and its token. Returns the number of merchants removed.
    pub(crate) async fn remove_app(&self, client_key: &ClientKey) -> Result<i64, RegistryError> {
        let _serialized = self.writes.lock().await;
        let removed = self.store.apps().remove(client_key).await?.ok_or_else(|| {
            RegistryError::UnknownApp {
                client_key: client_key.clone(),
            }
        })?;
        self.merchants.write().retain(|_, app| app != client_key);
        self.tokens.app_removed(client_key);
        tracing::info!(app = %client_key, merchants_removed = removed, "app removed");
        Ok(removed)
    }

    pub(crate) async fn list_apps(&self) -> Result<Vec<AppRecord>, RegistryError> {
        Ok(self.store.apps().list().await?)
    }

    /// Adds a merchant or moves it to another app. Returns true when it is new.
    pub(crate) async fn put_merchant(
        &self,
        account_id: &AccountId,
        client_key: &ClientKey,
    ) -> Result<bool, RegistryError> {
        let _serialized = self.writes.lock().await;
        let created = self
            .store
            .merchants()
            .put(
                account_id,
                client_key,
                Source::Admin,
                self.clock.now_unix_ms(),
            )
            .await?
            .ok_or_else(|| RegistryError::UnknownApp {
                client_key: client_key.clone(),
            })?;
        self.merchants
            .write()
            .insert(account_id.clone(), client_key.clone());
        tracing::info!(merchant = %account_id, app = %client_key, created, "merchant stored");
        Ok(created)
    }

    pub(crate) async fn remove_merchant(
        &self,
        account_id: &AccountId,
    ) -> Result<(), RegistryError> {
        let _serialized = self.writes.lock().await;
        if !self.store.merchants().remove(account_id).await? {
            return Err(RegistryError::UnknownMerchant {
                account_id: account_id.clone(),
            });
        }
        self.merchants.write().remove(account_id);
        tracing::info!(merchant = %account_id, "merchant removed");
        Ok(())
    }

    pub(crate) async fn list_merchants(&self) -> Result<Vec<MerchantRecord>, RegistryError> {
        Ok(self.store.merchants().list().await?)
    }
}

/// What the store keeps of a client: its key's hash in hex, and scopes and
/// bounds as the text the config file and the CLI use.
fn client_record(client: &ApiClient, source: Source) -> ClientRecord {
    ClientRecord {
        name: client.name.clone(),
        key_sha256: client.key_hash.to_hex(),
        scopes: client
            .scopes
            .iter()
            .map(|scope| scope.as_str().to_owned())
            .collect(),
        apps: client.apps.as_ref().map(|apps| {
            apps.iter()
                .map(|client_key| client_key.expose().to_owned())
                .collect()
        }),
        merchants: client.merchants.as_ref().map(|merchants| {
            merchants
                .iter()
                .map(|account_id| account_id.as_str().to_owned())
                .collect()
        }),
        source,
    }
}

/// Turns a stored client into the form the request path checks.
fn api_client_from_record(record: &ClientRecord) -> Result<ApiClient, StoreError> {
    let corrupt =
        |message: String| StoreError::Corrupt(format!("client {:?}: {message}", record.name));
    Ok(ApiClient {
        name: record.name.clone(),
        key_hash: KeyHash::parse_hex(&record.key_sha256).map_err(corrupt)?,
        scopes: record
            .scopes
            .iter()
            .map(|scope| Scope::parse(scope))
            .collect::<Result<_, _>>()
            .map_err(corrupt)?,
        apps: record
            .apps
            .as_ref()
            .map(|apps| {
                apps.iter()
                    .map(|app| ClientKey::parse(app))
                    .collect::<Result<_, _>>()
            })
            .transpose()
            .map_err(|error| corrupt(error.to_string()))?,
        merchants: record
            .merchants
            .as_ref()
            .map(|merchants| {
                merchants
                    .iter()
                    .map(|merchant| AccountId::parse(merchant))
                    .collect::<Result<_, _>>()
            })
            .transpose()
            .map_err(|error| corrupt(error.to_string()))?,
    })
}
