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
    /// Changing what the config file declares over AdminService would last
    /// only until the next reload or restart re-applies the file (and resets
    /// the token generation of an app it re-creates).
    #[error(
        "{what} is declared in the config file; edit the file and reload (`douyin-tokend reload`) instead: a change made here would be undone by the next reload"
    )]
    DeclaredInConfig { what: String },
    #[error(
        "{client_key} still serves {merchants} merchant(s); remove them first, or remove them with the app (`app remove --cascade`)"
    )]
    AppServesMerchants {
        client_key: ClientKey,
        merchants: i64,
    },
    #[error(
        "client {name:?} is the last one with the admin scope; create another admin client first, or nobody could administer the daemon"
    )]
    LastAdminClient { name: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a configuration reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ReloadReport {
    pub(crate) apps_added: usize,
    pub(crate) apps_removed: usize,
    pub(crate) app_secrets_changed: usize,
    pub(crate) merchants_added: usize,
    pub(crate) merchants_removed: usize,
    pub(crate) merchants_moved: usize,
    pub(crate) clients_added: usize,
    pub(crate) clients_removed: usize,
    pub(crate) clients_changed: usize,
    /// Apps the file declares whose secret is the one already in force: the
    /// reload log names those read from systemd credentials, which systemd
    /// copies only at start.
    pub(crate) unchanged_secrets: BTreeSet<ClientKey>,
}

#[derive(Clone)]
pub(crate) struct Registry {
    store: Store,
    tokens: TokenManager,
    clock: SharedClock,
    merchants: Arc<RwLock<HashMap<AccountId, ClientKey>>>,
    authenticator: Authenticator,
    /// Clients the daemon makes for itself and keeps out of the store (the
    /// reload key `systemctl reload` uses); they last as long as the process.
    internal_clients: Arc<RwLock<Vec<ApiClient>>>,
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
            internal_clients: Arc::new(RwLock::new(Vec::new())),
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
        let mut clients = self
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
        clients.extend(self.internal_clients.read().iter().cloned());
        self.authenticator.replace(clients);
        Ok(())
    }

    /// Lets a client the daemon made for itself call, until the process ends;
    /// it is never stored or listed.
    pub(crate) async fn admit_internal_client(&self, client: ApiClient) -> Result<(), StoreError> {
        let _serialized = self.writes.lock().await;
        self.internal_clients.write().push(client);
        self.reload_clients().await
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

    /// Removes a client made over AdminService; refuses one the config file
    /// declares and the last one holding the admin scope.
    pub(crate) async fn remove_client(&self, name: &str) -> Result<(), RegistryError> {
        let _serialized = self.writes.lock().await;
        let clients = self.store.clients().list().await?;
        let Some(client) = clients.iter().find(|client| client.name == name) else {
            return Err(RegistryError::UnknownClient {
                name: name.to_owned(),
            });
        };
        if client.source == Source::Config {
            return Err(RegistryError::DeclaredInConfig {
                what: format!("client {name:?}"),
            });
        }
        let is_admin = |client: &ClientRecord| {
            client
                .scopes
                .iter()
                .any(|scope| scope == Scope::Admin.as_str())
        };
        if is_admin(client)
            && !clients
                .iter()
                .any(|other| other.name != name && is_admin(other))
        {
            return Err(RegistryError::LastAdminClient {
                name: name.to_owned(),
            });
        }
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

    /// Applies a re-read config file (SIGHUP, AdminService.ReloadConfig) to
    /// the running daemon: syncs the database as at start-up, tells the token
    /// manager about apps that came, went or changed secret (tokens of the
    /// others stay as they are), rebuilds the merchant map and the client list
    /// from the database, and says what changed.
    pub(crate) async fn reload_config(
        &self,
        declarations: &Declarations,
    ) -> Result<ReloadReport, RegistryError> {
        let _serialized = self.writes.lock().await;
        let clients_before: HashMap<String, ClientRecord> = self
            .store
            .clients()
            .list()
            .await?
            .into_iter()
            .map(|client| (client.name.clone(), client))
            .collect();
        // A file that drops the last admin client would leave nobody able to
        // administer the daemon (AdminService would refuse the same removal).
        let is_admin = |client: &&ClientRecord| {
            client
                .scopes
                .iter()
                .any(|scope| scope == Scope::Admin.as_str())
        };
        let admins_remain = declarations
            .clients
            .iter()
            .any(|client| client.scopes.contains(&Scope::Admin))
            || clients_before
                .values()
                .filter(|client| client.source == Source::Admin)
                .any(|client| is_admin(&client));
        if !admins_remain && let Some(last) = clients_before.values().find(is_admin) {
            return Err(RegistryError::LastAdminClient {
                name: last.name.clone(),
            });
        }
        Self::sync_config(&self.store, declarations, self.clock.now_unix_ms()).await?;
        let declared_keys: HashSet<&ClientKey> = declarations
            .apps
            .iter()
            .map(|app| &app.client_key)
            .collect();
        Ok(self
            .take_stored_state(&clients_before, &declared_keys)
            .await?)
    }

    /// Another daemon sharing the database changed apps, merchants or
    /// clients (or this one reconnected to it): memory follows the store.
    pub(crate) async fn reread_from_store(&self) -> Result<(), StoreError> {
        let _serialized = self.writes.lock().await;
        let report = self
            .take_stored_state(&HashMap::new(), &HashSet::new())
            .await?;
        tracing::debug!(
            apps_added = report.apps_added,
            apps_removed = report.apps_removed,
            "re-read apps, merchants and clients from the database"
        );
        Ok(())
    }

    /// Makes memory (clients, apps in the token manager, merchant → app)
    /// what the store holds, and reports the difference from before; the
    /// caller holds `writes`.
    async fn take_stored_state(
        &self,
        clients_before: &HashMap<String, ClientRecord>,
        declared_keys: &HashSet<&ClientKey>,
    ) -> Result<ReloadReport, StoreError> {
        self.reload_clients().await?;
        let clients_after = self.store.clients().list().await?;
        let stored_apps = self.store.apps().list().await?;
        let stored_merchants: HashMap<AccountId, ClientKey> = self
            .store
            .merchants()
            .list()
            .await?
            .into_iter()
            .map(|merchant| (merchant.account_id, merchant.client_key))
            .collect();
        let secrets_in_force: HashMap<ClientKey, ClientSecret> = self
            .tokens
            .status()
            .into_iter()
            .filter_map(|view| {
                let secret = self.tokens.app_secret(&view.client_key)?;
                Some((view.client_key, secret))
            })
            .collect();
        let stored_keys: HashSet<&ClientKey> =
            stored_apps.iter().map(|app| &app.client_key).collect();
        let mut report = ReloadReport::default();
        for app in &stored_apps {
            match secrets_in_force.get(&app.client_key) {
                None => report.apps_added += 1,
                Some(secret) if *secret != app.client_secret => report.app_secrets_changed += 1,
                Some(_) if declared_keys.contains(&app.client_key) => {
                    report.unchanged_secrets.insert(app.client_key.clone());
                }
                Some(_) => {}
            }
            // Unchanged secrets leave the app's token and state untouched.
            self.tokens
                .app_put(&app.client_key, app.client_secret.clone());
        }
        for client_key in secrets_in_force.keys() {
            if !stored_keys.contains(client_key) {
                report.apps_removed += 1;
                self.tokens.app_removed(client_key);
            }
        }
        for client in &clients_after {
            match clients_before.get(&client.name) {
                None => report.clients_added += 1,
                Some(before) if before != client => report.clients_changed += 1,
                Some(_) => {}
            }
        }
        report.clients_removed = clients_before
            .keys()
            .filter(|name| !clients_after.iter().any(|client| &client.name == *name))
            .count();
        let mut merchants_in_memory = self.merchants.write();
        for (account_id, client_key) in &stored_merchants {
            match merchants_in_memory.get(account_id) {
                None => report.merchants_added += 1,
                Some(before) if before != client_key => report.merchants_moved += 1,
                Some(_) => {}
            }
        }
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
    /// Refuses an app the config file declares.
    pub(crate) async fn put_app(
        &self,
        client_key: &ClientKey,
        client_secret: &ClientSecret,
    ) -> Result<bool, RegistryError> {
        let _serialized = self.writes.lock().await;
        if let Some((Source::Config, _)) = self
            .store
            .apps()
            .source_and_merchant_count(client_key)
            .await?
        {
            return Err(RegistryError::DeclaredInConfig {
                what: client_key.to_string(),
            });
        }
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

    /// Removes an app and its token, and its merchants when `cascade`
    /// (refused without it while it serves any). Refuses an app the config
    /// file declares. Returns the number of merchants removed.
    pub(crate) async fn remove_app(
        &self,
        client_key: &ClientKey,
        cascade: bool,
    ) -> Result<i64, RegistryError> {
        let _serialized = self.writes.lock().await;
        match self
            .store
            .apps()
            .source_and_merchant_count(client_key)
            .await?
        {
            None => {
                return Err(RegistryError::UnknownApp {
                    client_key: client_key.clone(),
                });
            }
            Some((Source::Config, _)) => {
                return Err(RegistryError::DeclaredInConfig {
                    what: client_key.to_string(),
                });
            }
            Some((Source::Admin, merchants)) if merchants > 0 && !cascade => {
                return Err(RegistryError::AppServesMerchants {
                    client_key: client_key.clone(),
                    merchants,
                });
            }
            Some((Source::Admin, _)) => {}
        }
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

    /// Adds a merchant or moves it to another app. Returns true when it is
    /// new. Refuses to move a merchant the config file declares.
    pub(crate) async fn put_merchant(
        &self,
        account_id: &AccountId,
        client_key: &ClientKey,
    ) -> Result<bool, RegistryError> {
        let _serialized = self.writes.lock().await;
        self.refuse_declared_merchant(account_id).await?;
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

    /// Removes a merchant added over AdminService; refuses one the config
    /// file declares. Returns the app that served it.
    pub(crate) async fn remove_merchant(
        &self,
        account_id: &AccountId,
    ) -> Result<ClientKey, RegistryError> {
        let _serialized = self.writes.lock().await;
        let unknown = || RegistryError::UnknownMerchant {
            account_id: account_id.clone(),
        };
        let merchant = self
            .refuse_declared_merchant(account_id)
            .await?
            .ok_or_else(unknown)?;
        if !self.store.merchants().remove(account_id).await? {
            return Err(unknown());
        }
        self.merchants.write().remove(account_id);
        tracing::info!(merchant = %account_id, "merchant removed");
        Ok(merchant.client_key)
    }

    /// The merchant as stored, when there is one; refused when the config
    /// file declares it.
    async fn refuse_declared_merchant(
        &self,
        account_id: &AccountId,
    ) -> Result<Option<MerchantRecord>, RegistryError> {
        match self.store.merchants().find(account_id).await? {
            Some(merchant) if merchant.source == Source::Config => {
                Err(RegistryError::DeclaredInConfig {
                    what: format!("merchant {account_id}"),
                })
            }
            found => Ok(found),
        }
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
