//! The daemon's typed configuration: defaults, the TOML file, environment
//! overrides, and validation that names the offending key, all done before
//! anything is opened or bound.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::access::{ApiClient, KeyHash, Scope};
use crate::domain::{AccountId, ClientKey, ClientSecret, DouyinApi, RateScope};
use crate::schedule::CronSchedule;
use crate::store::{DatabaseLocation, PostgresDatabase};

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// More threads than this would only contend: the daemon's work per call is
/// short, and Douyin's rate limits bound the calls.
const MAX_WORKER_THREADS: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The gRPC listen address: `127.0.0.1:50051`, or `unix:/path/to/socket`.
    pub listen: ListenAddress,
    /// Permissions of the Unix socket (only with `listen = "unix:…"`).
    pub unix_socket_mode: UnixSocketMode,
    /// TLS for the gRPC listener; absent means plaintext (fine on loopback or a Unix socket).
    pub tls: Option<TlsConfig>,
    /// A SQLite file, or a `postgres://` URL naming a database that several
    /// daemons share (see [`DatabaseSetting`]).
    pub database: DatabaseSetting,
    /// The PostgreSQL password (PostgreSQL only). A relative path is looked up
    /// in `$CREDENTIALS_DIRECTORY`; absent, the credential `database-password`
    /// is used when it exists. Read by [`Config::database_location`].
    pub database_password_file: Option<PathBuf>,
    /// The master key that seals secrets and tokens in the database (64 hex
    /// digits). Default: `$CREDENTIALS_DIRECTORY/master-key` when that exists,
    /// else `master.key` beside the database. A relative path is looked up in
    /// `$CREDENTIALS_DIRECTORY` when set, else beside the database. Created
    /// (mode 0600) on the first start of a new database. With PostgreSQL there
    /// is no "beside the database": see [`Config::master_key_path`].
    pub master_key_file: Option<PathBuf>,
    /// How long in-flight RPCs may run on after a shutdown signal.
    #[serde(with = "humane_duration")]
    pub shutdown_grace: Duration,
    /// Threads the daemon's own work runs on. 1 (the default) is one thread
    /// for everything async, the cheapest per call: no work stealing, no
    /// wake-ups across threads (BENCHMARKS.md §8: about a third less CPU per
    /// lookup and per hand-out than two workers). More, for a host where one
    /// core cannot carry the calls. SQLite keeps its own threads either way.
    pub worker_threads: usize,
    pub douyin: DouyinConfig,
    pub refresh: RefreshConfig,
    pub lookup: LookupConfig,
    pub audit: AuditConfig,
    pub apps: Vec<AppEntry>,
    pub merchants: Vec<MerchantEntry>,
    /// Services allowed to call the daemon; more can be added over AdminService.
    pub clients: Vec<ClientEntry>,
    /// Where Prometheus scrapes `/metrics`; absent (the default) turns metrics off.
    pub metrics_listen: Option<SocketAddr>,
    /// Douyin's refund-request notifications (抖音码退款申请通知); off by default.
    pub webhook: WebhookConfig,
    /// `[cluster]`: how daemons sharing a PostgreSQL database hand a fetch
    /// over and find the database again. Absent: the defaults. Refused with
    /// SQLite, which no other daemon shares.
    pub cluster: Option<ClusterConfig>,
}

/// The `database` key: a SQLite file (the default, one daemon per file), or
/// a PostgreSQL database that several daemons share, written as a
/// `postgres://` or `postgresql://` URL. Anything that is not such a URL is a
/// SQLite path, as it always was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseSetting {
    Sqlite(PathBuf),
    Postgres(PostgresUrl),
}

impl DatabaseSetting {
    /// Reads the `database` value; a PostgreSQL URL is checked as
    /// [`PostgresUrl::parse`] says.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            PostgresUrl::parse(text).map(Self::Postgres)
        } else {
            Ok(Self::Sqlite(PathBuf::from(text)))
        }
    }
}

impl std::fmt::Display for DatabaseSetting {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(formatter, "{}", path.display()),
            Self::Postgres(url) => formatter.write_str(url.as_str()),
        }
    }
}

impl<'de> Deserialize<'de> for DatabaseSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::parse(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// A PostgreSQL URL as the config file may hold it: it names a database and
/// carries no password. The text is kept as written, for sqlx to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// Checks `text` with the `url` crate (the parser sqlx uses). A password
    /// (after `user:` or as `?password=`) is refused: whoever reads the file
    /// or a log line naming the database would learn it. Refusals never quote
    /// the URL, so a refused password is not printed either. The Unix-socket
    /// form (`postgres:///dbname?host=/run/postgresql&user=tokend`) is fine;
    /// the database may also come as `?dbname=`, which sqlx reads too.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = reqwest::Url::parse(text).map_err(|error| {
            format!("not a PostgreSQL URL like postgres://tokend@db.example:5432/tokend: {error}")
        })?;
        if url.password().is_some() || url.query_pairs().any(|(key, _)| key == "password") {
            return Err(format!(
                "the URL holds a password; the password must come from database_password_file or the systemd credential {DATABASE_PASSWORD_CREDENTIAL}, never the config file"
            ));
        }
        let database_in_path = !url.path().trim_start_matches('/').is_empty();
        let database_in_query = url
            .query_pairs()
            .any(|(key, value)| key == "dbname" && !value.is_empty());
        if !database_in_path && !database_in_query {
            return Err(
                "the URL names no database; write it after the host, like postgres://tokend@db.example:5432/tokend (or postgres:///tokend?host=/run/postgresql&user=tokend over a Unix socket)"
                    .to_owned(),
            );
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The systemd credential that holds the PostgreSQL password when
/// `database_password_file` is not set.
const DATABASE_PASSWORD_CREDENTIAL: &str = "database-password";

/// The webhook receiver of Douyin's refund-request notifications.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// `host:port` (e.g. `0.0.0.0:8443`); absent (the default) turns the receiver off.
    #[serde(deserialize_with = "tcp_address")]
    pub listen: Option<SocketAddr>,
    /// The URL path Douyin posts to; the console's callback URL ends with it.
    pub path: String,
    /// How long stored notifications are kept (pruned on `audit.prune`'s schedule).
    #[serde(with = "humane_duration")]
    pub(crate) retention: Duration,
    /// Larger bodies are refused with 400 before they are read whole.
    pub max_body_bytes: usize,
    /// Certificate and key of this listener (Douyin requires an https callback);
    /// absent: plain HTTP, for a terminating proxy in front.
    pub tls: Option<TlsConfig>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            listen: None,
            path: "/douyin/webhook".to_owned(),
            retention: Duration::from_secs(30 * 24 * 3600),
            max_body_bytes: 64 * 1024,
            tls: None,
        }
    }
}

/// `webhook.listen`: `host:port` as `listen` takes it, but never a Unix socket.
fn tcp_address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    match String::deserialize(deserializer)?.parse::<ListenAddress>() {
        Ok(ListenAddress::Tcp(address)) => Ok(Some(address)),
        Ok(ListenAddress::Unix(_)) => Err(serde::de::Error::custom(
            "Douyin reaches the webhook over TCP: give host:port, like 0.0.0.0:8443",
        )),
        Err(message) => Err(serde::de::Error::custom(message)),
    }
}

/// The `[cluster]` table (PostgreSQL only): the timing of the agreement
/// between daemons sharing the database.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How long a daemon's fetch lease on an app holds: while it holds, the
    /// other daemons wait for its token instead of fetching their own; when a
    /// daemon dies mid-fetch, another takes the fetch over this long after it
    /// began, at the latest.
    #[serde(with = "humane_duration")]
    pub fetch_lease: Duration,
    /// The longest delay between two attempts of the link (LISTEN and the
    /// re-read) to find the database again; delays double from
    /// [`CLUSTER_RECONNECT_FIRST`] up to this while the database is away, so
    /// after it returns the link is back within this (and the re-read).
    #[serde(with = "humane_duration")]
    pub reconnect_backoff_max: Duration,
}

/// The link's first reconnect delay, doubled up to `cluster.reconnect_backoff_max`.
pub(crate) const CLUSTER_RECONNECT_FIRST: Duration = Duration::from_millis(250);
/// Bounds of `cluster.fetch_lease`. Shorter than a second, a healthy
/// daemon's fetch would often outlive its lease, and another daemon would
/// fetch a second token beside it; longer than a minute, callers would wait
/// that long for a daemon that died mid-fetch.
const FETCH_LEASE_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// Upper bound of `cluster.reconnect_backoff_max`: beyond it, a daemon would
/// learn of the others' changes that much later after the database returned.
const RECONNECT_BACKOFF_MAX_BOUND: Duration = Duration::from_secs(300);

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            fetch_lease: Duration::from_secs(8),
            reconnect_backoff_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DouyinConfig {
    pub base_url: String,
    /// Upper bound of one upstream HTTP request.
    #[serde(with = "humane_duration")]
    pub(crate) request_timeout: Duration,
    #[serde(with = "humane_duration")]
    pub(crate) connect_timeout: Duration,
    /// `client_token` (default) or `stable_client_token`.
    pub token_endpoint: TokenEndpoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenEndpoint {
    ClientToken,
    StableClientToken,
}

impl TokenEndpoint {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::ClientToken => "/oauth/client_token/",
            Self::StableClientToken => "/oauth/stable_client_token/",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshConfig {
    /// How long before expiry the refresh window opens.
    #[serde(with = "humane_duration")]
    pub window_start: Duration,
    /// How long before expiry the refresh window closes.
    #[serde(with = "humane_duration")]
    pub window_end: Duration,
    /// Never fetch twice for one app within this, unless its token is known dead.
    #[serde(with = "humane_duration")]
    pub min_interval: Duration,
    /// When the refresh sweep runs; `None` (written "off") disables it.
    #[serde(deserialize_with = "cron_or_off")]
    pub sweep: Option<CronSchedule>,
    /// First retry delay after a transient fetch failure; doubles up to `backoff_max`.
    #[serde(with = "humane_duration")]
    pub backoff_initial: Duration,
    #[serde(with = "humane_duration")]
    pub backoff_max: Duration,
    /// After a permanent failure (bad secret, unknown app), wait this long before
    /// trying again on its own; updating the app's secret retries at once.
    #[serde(with = "humane_duration")]
    pub(crate) permanent_failure_cooldown: Duration,
    /// How many token fetches run at once, across all apps.
    pub(crate) max_concurrent_fetches: usize,
    /// Token endpoint calls allowed across all apps per `budget_window`
    /// (Douyin allows 500 per 5 minutes).
    pub budget: usize,
    #[serde(with = "humane_duration")]
    pub(crate) budget_window: Duration,
    /// Part of the budget that only urgent fetches (a caller waiting, a
    /// rejected token, an operator's forced refresh) may use.
    pub budget_reserve: usize,
    /// After Douyin answers 10020 (too many token calls), scheduled refreshes
    /// pause this long.
    #[serde(with = "humane_duration")]
    pub(crate) rate_limited_pause: Duration,
    /// ReportInvalidToken refreshes an app at most once per this interval.
    #[serde(with = "humane_duration")]
    pub report_min_interval: Duration,
}

/// How lookups treat Douyin: rate, concurrency, deadlines, retries, coalescing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupConfig {
    /// Rate groups by Douyin API name (`[lookup.rates.after_sale_order_detail]`,
    /// `after_sale_order_list`, `after_sale_order_audit`); an API not listed
    /// runs at the rate its Douyin page documents (the list API's rate counts
    /// every app together, per developer).
    pub(crate) rates: BTreeMap<DouyinApi, ApiRateConfig>,
    /// Calls in flight to Douyin at once, per rate group (per app, or for the
    /// whole developer on a per-developer API).
    pub(crate) max_concurrent_per_app: usize,
    /// The deadline of a request that carries none.
    #[serde(with = "humane_duration")]
    pub default_deadline: Duration,
    /// Time a queued request must still have for the upstream call itself;
    /// a request whose deadline leaves less is refused at once.
    #[serde(with = "humane_duration")]
    pub(crate) upstream_time_reserve: Duration,
    /// Tries in all for a transient failure (busy codes, 5xx, timeouts, connection errors).
    pub(crate) max_tries: u32,
    #[serde(with = "humane_duration")]
    pub retry_backoff_initial: Duration,
    #[serde(with = "humane_duration")]
    pub retry_backoff_max: Duration,
    /// Keep successful answers this long and serve repeats from memory; "0s" (the default) turns the cache off.
    #[serde(with = "humane_duration")]
    pub cache_ttl: Duration,
}

/// One Douyin API's rate group: calls per second per app (or per developer,
/// for an API Douyin counts that way).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ApiRateConfig {
    /// Calls per second per app (per developer for a per-developer API);
    /// absent = the rate Douyin documents for the API.
    /// Never zero: an app whose calls must stop loses its merchants instead.
    pub(crate) per_second: Option<NonZeroU32>,
    /// Per-app overrides, keyed by client_key; refused for a per-developer API.
    pub(crate) per_app: HashMap<ClientKey, NonZeroU32>,
}

impl LookupConfig {
    /// Sets the calls per second per app of `api` (tests, benchmarks, the
    /// demo). Zero counts as one, as a rate group cannot stop calls.
    pub fn set_rate_per_second(&mut self, api: DouyinApi, per_second: u32) {
        self.rates.entry(api).or_default().per_second = NonZeroU32::new(per_second.max(1));
    }

    /// The `lookup.rates.<api>.per_app.<client_key>` entries naming an app
    /// that `is_known` does not know, as config keys, sorted. Such an entry
    /// is warned about, not refused: an app can be registered through
    /// AdminService rather than declared in the file, and refusing a rate for
    /// an app removed later would turn `app remove` into a failed restart.
    pub fn per_app_rates_for_unknown_apps(
        &self,
        is_known: impl Fn(&ClientKey) -> bool,
    ) -> Vec<String> {
        let mut keys: Vec<String> = self
            .rates
            .iter()
            .flat_map(|(api, group)| {
                group
                    .per_app
                    .keys()
                    .filter(|client_key| !is_known(client_key))
                    .map(move |client_key| format!("lookup.rates.{api}.per_app.{client_key}"))
            })
            .collect();
        keys.sort();
        keys
    }

    /// Calls per second allowed to `client_key` on `api`.
    pub(crate) fn rate_per_second(&self, api: DouyinApi, client_key: &ClientKey) -> NonZeroU32 {
        let group = self.rates.get(&api);
        group
            .and_then(|group| group.per_app.get(client_key).copied())
            .or_else(|| group.and_then(|group| group.per_second))
            .unwrap_or_else(|| api.documented_rate_per_second())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppEntry {
    pub client_key: ClientKey,
    /// A file holding the secret; relative paths are looked up in
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) when it is set.
    pub client_secret_file: Option<PathBuf>,
    /// An environment variable holding the secret.
    pub client_secret_env: Option<String>,
}

/// Where the gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix("unix:") {
            Some(path) if Path::new(path).is_absolute() => Ok(Self::Unix(PathBuf::from(path))),
            Some(_) => Err(format!("{text:?}: a Unix socket path must be absolute, like unix:/run/douyin-tokend/grpc.sock")),
            None => text
                .parse()
                .ok()
                .or_else(|| resolve_host_and_port(text))
                .map(Self::Tcp)
                .ok_or_else(|| format!("{text:?} is not an address like 127.0.0.1:50051, localhost:50051 or unix:/run/douyin-tokend/grpc.sock")),
        }
    }
}

/// `host:port` with a host name (`localhost:50051`, as the CLI's `--daemon`
/// takes it), resolved once at load; an IPv4 address is preferred, since
/// `localhost` often lists `::1` first and IPv4-only clients would miss it.
fn resolve_host_and_port(text: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    let (host, port) = text.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    let addresses: Vec<SocketAddr> = text.to_socket_addrs().ok()?.collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or_else(|| addresses.first())
        .copied()
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(address) => write!(formatter, "{address}"),
            Self::Unix(path) => write!(formatter, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Certificate and key (PEM) of the gRPC listener; with `client_ca_file`,
/// clients must present a certificate signed by that CA (mutual TLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Each named file is a readable file; `table` is the key it sits under.
    fn check_files_exist(&self, table: &str) -> Result<(), ConfigError> {
        for (name, file) in [
            ("cert_file", Some(&self.cert_file)),
            ("key_file", Some(&self.key_file)),
            ("client_ca_file", self.client_ca_file.as_ref()),
        ] {
            if let Some(file) = file
                && !file.is_file()
            {
                return Err(ConfigError::invalid(
                    format!("{table}.{name}"),
                    format!("{} is not a readable file", file.display()),
                ));
            }
        }
        Ok(())
    }
}

/// How long the audit trail is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    #[serde(with = "humane_duration")]
    pub(crate) retention: Duration,
    /// When the pruning job runs.
    pub(crate) prune: CronSchedule,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(90 * 24 * 3600),
            prune: CronSchedule::parse("0 17 * * * *").expect("the default prune schedule parses"),
        }
    }
}

/// An API client declared in the config file: its key's SHA-256 (never the key).
/// The rules every client keeps (a name, a scope) are `ApiClient::declare`'s,
/// checked by [`Config::resolve_clients`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    pub(crate) name: String,
    /// `douyin-tokend client new-key` prints a key and this hash.
    pub(crate) key_sha256: KeyHash,
    /// Any of "aftersale.read", "aftersale.audit", "aftersale.events", "token.read", "token.report",
    /// "config.reload", "admin".
    pub(crate) scopes: BTreeSet<Scope>,
    /// Only these apps (client_key), when given.
    pub(crate) apps: Option<BTreeSet<ClientKey>>,
    /// Only these merchants (account_id), when given.
    pub(crate) merchants: Option<BTreeSet<AccountId>>,
}

impl ClientEntry {
    /// A client with every scope and no bounds, declared by its key's hash
    /// (the demo's, the tests' and the benchmarks' own caller).
    pub fn with_every_scope(name: &str, api_key: &str) -> Self {
        Self {
            name: name.to_owned(),
            key_sha256: KeyHash::of_key(api_key),
            scopes: Scope::ALL.into_iter().collect(),
            apps: None,
            merchants: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantEntry {
    pub account_id: AccountId,
    pub client_key: ClientKey,
}

/// An app from the config file with its secret read and checked.
#[derive(Debug, Clone)]
pub struct ResolvedApp {
    pub(crate) client_key: ClientKey,
    pub(crate) client_secret: ClientSecret,
}

impl ResolvedApp {
    /// The app's identifier (not a secret).
    pub fn client_key(&self) -> &ClientKey {
        &self.client_key
    }
}

/// Everything the config file declares for the registry: apps with their
/// secrets read, merchants and API clients, all checked. The registry turns
/// them into what the store keeps.
#[derive(Debug, Clone)]
pub struct Declarations {
    pub apps: Vec<ResolvedApp>,
    pub merchants: Vec<MerchantEntry>,
    pub clients: Vec<ApiClient>,
}

/// Permission bits of the Unix socket, written in the file as octal text
/// (`"0660"`) and checked at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixSocketMode(u32);

impl UnixSocketMode {
    pub(crate) fn from_octal(text: &str) -> Result<Self, String> {
        match u32::from_str_radix(text, 8) {
            Ok(bits) if bits <= 0o777 => Ok(Self(bits)),
            _ => Err(format!("{text:?} is not octal permissions like \"0660\"")),
        }
    }

    pub(crate) fn bits(self) -> u32 {
        self.0
    }
}

impl Default for UnixSocketMode {
    /// The daemon's user and group.
    fn default() -> Self {
        Self(0o660)
    }
}

impl std::fmt::Display for UnixSocketMode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{:04o}", self.0)
    }
}

impl<'de> Deserialize<'de> for UnixSocketMode {
    /// Octal text (`"0660"`) or a TOML octal integer (`0o660`).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Bits(u32),
        }
        match Written::deserialize(deserializer)? {
            Written::Text(text) => Self::from_octal(&text),
            Written::Bits(bits) if bits <= 0o777 => Ok(Self(bits)),
            Written::Bits(bits) => Err(format!(
                "{bits:#o} is not permission bits like \"0660\" or 0o660"
            )),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// `refresh.sweep`: a cron, or "off" for no sweep at all (tests and
/// benchmarks that drive the sweep themselves).
fn cron_or_off<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<CronSchedule>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text == "off" {
        return Ok(None);
    }
    CronSchedule::parse_or_else(&text, " or \"off\"")
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ListenAddress::Tcp(SocketAddr::from(([127, 0, 0, 1], 50051))),
            unix_socket_mode: UnixSocketMode::default(),
            tls: None,
            database: DatabaseSetting::Sqlite(default_database_path(
                std::env::var_os("STATE_DIRECTORY").as_deref(),
            )),
            database_password_file: None,
            master_key_file: None,
            shutdown_grace: Duration::from_secs(10),
            worker_threads: 1,
            douyin: DouyinConfig::default(),
            refresh: RefreshConfig::default(),
            lookup: LookupConfig::default(),
            audit: AuditConfig::default(),
            apps: Vec::new(),
            merchants: Vec::new(),
            clients: Vec::new(),
            metrics_listen: None,
            webhook: WebhookConfig::default(),
            cluster: None,
        }
    }
}

impl Default for DouyinConfig {
    fn default() -> Self {
        Self {
            base_url: "https://open.douyin.com".to_owned(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            token_endpoint: TokenEndpoint::ClientToken,
        }
    }
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            window_start: Duration::from_secs(25 * 60),
            window_end: Duration::from_secs(15 * 60),
            min_interval: Duration::from_secs(5 * 60),
            sweep: Some(
                CronSchedule::parse("*/15 * * * * *").expect("the default sweep schedule parses"),
            ),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5 * 60),
            permanent_failure_cooldown: Duration::from_secs(10 * 60),
            max_concurrent_fetches: 8,
            budget: 500,
            budget_window: Duration::from_secs(5 * 60),
            budget_reserve: 50,
            rate_limited_pause: Duration::from_secs(60),
            report_min_interval: Duration::from_secs(30),
        }
    }
}

impl Default for LookupConfig {
    fn default() -> Self {
        Self {
            rates: BTreeMap::new(),
            max_concurrent_per_app: 10,
            default_deadline: Duration::from_secs(5),
            upstream_time_reserve: Duration::from_millis(200),
            max_tries: 3,
            retry_backoff_initial: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            cache_ttl: Duration::ZERO,
        }
    }
}

/// Under systemd (`StateDirectory=`) the database lives in the state directory.
fn default_database_path(state_directory: Option<&std::ffi::OsStr>) -> PathBuf {
    match state_directory {
        Some(directory) => Path::new(directory).join("tokend.db"),
        None => PathBuf::from("douyin-tokend.db"),
    }
}

impl Config {
    /// Reads the file when one is given (defaults otherwise), applies the
    /// environment overrides, and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_toml_file(path)?,
            None => Self::default(),
        };
        config.apply_environment(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    pub(crate) fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses a config document. Every error starts with the dotted key it is
    /// about (`refresh.window_end: …`), then says where it is.
    pub(crate) fn from_toml_str(text: &str) -> Result<Self, String> {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|error| describe_toml_error(text, None, &error))?;
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let key = error.path().to_string();
            describe_toml_error(text, Some(key), error.inner())
        })
    }

    /// `DOUYIN_TOKEND_LISTEN`, `DOUYIN_TOKEND_DATABASE` and
    /// `DOUYIN_TOKEND_DOUYIN_BASE_URL` override the file.
    pub(crate) fn apply_environment(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(listen) = lookup("DOUYIN_TOKEND_LISTEN") {
            self.listen = listen
                .parse()
                .map_err(|message| ConfigError::invalid("DOUYIN_TOKEND_LISTEN", message))?;
        }
        if let Some(database) = lookup("DOUYIN_TOKEND_DATABASE") {
            self.database = DatabaseSetting::parse(&database)
                .map_err(|message| ConfigError::invalid("DOUYIN_TOKEND_DATABASE", message))?;
        }
        if let Some(base_url) = lookup("DOUYIN_TOKEND_DOUYIN_BASE_URL") {
            self.douyin.base_url = base_url;
        }
        Ok(())
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.validate_database()?;
        if !(1..=MAX_WORKER_THREADS).contains(&self.worker_threads) {
            return Err(ConfigError::invalid(
                "worker_threads",
                format!("must be between 1 and {MAX_WORKER_THREADS}"),
            ));
        }
        let base_url = reqwest::Url::parse(&self.douyin.base_url).map_err(|error| {
            ConfigError::invalid("douyin.base_url", format!("not a URL: {error}"))
        })?;
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(ConfigError::invalid(
                "douyin.base_url",
                "must start with https:// (or http:// for a local sandbox)",
            ));
        }
        if self.douyin.connect_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "douyin.connect_timeout",
                "must be above zero",
            ));
        }
        if self.douyin.request_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "douyin.request_timeout",
                "must be above zero",
            ));
        }
        // Port 0 (any free port) on both is fine: they cannot end up the same.
        if let (Some(metrics), ListenAddress::Tcp(listen)) = (self.metrics_listen, &self.listen)
            && metrics == *listen
            && listen.port() != 0
        {
            return Err(ConfigError::invalid(
                "metrics_listen",
                "must differ from listen (metrics are served over plain HTTP on a port of their own)",
            ));
        }
        let refresh = &self.refresh;
        if refresh.window_end.is_zero() {
            return Err(ConfigError::invalid(
                "refresh.window_end",
                "must be above zero",
            ));
        }
        if refresh.window_start <= refresh.window_end {
            return Err(ConfigError::invalid(
                "refresh.window_start",
                "must be longer than refresh.window_end (the window opens before it closes)",
            ));
        }
        if refresh.backoff_initial.is_zero() || refresh.backoff_max < refresh.backoff_initial {
            return Err(ConfigError::invalid(
                "refresh.backoff_max",
                "backoff_initial must be above zero and backoff_max at least backoff_initial",
            ));
        }
        if refresh.max_concurrent_fetches == 0 {
            return Err(ConfigError::invalid(
                "refresh.max_concurrent_fetches",
                "must be at least 1",
            ));
        }
        if let Some(tls) = &self.tls {
            tls.check_files_exist("tls")?;
        }
        self.validate_webhook()?;
        if refresh.budget == 0 || refresh.budget_reserve >= refresh.budget {
            return Err(ConfigError::invalid(
                "refresh.budget_reserve",
                "must be smaller than refresh.budget, which must be at least 1",
            ));
        }
        // API names and non-zero rates are checked as the file is read.
        let lookup = &self.lookup;
        if lookup.max_concurrent_per_app == 0 {
            return Err(ConfigError::invalid(
                "lookup.max_concurrent_per_app",
                "must be at least 1",
            ));
        }
        if lookup.max_tries == 0 || lookup.max_tries > 10 {
            return Err(ConfigError::invalid(
                "lookup.max_tries",
                "must be between 1 and 10",
            ));
        }
        for (api, group) in &lookup.rates {
            if api.rate_scope() == RateScope::PerDeveloper && !group.per_app.is_empty() {
                return Err(ConfigError::invalid(
                    format!("lookup.rates.{api}.per_app"),
                    "Douyin counts this API per developer (all apps together); give only per_second",
                ));
            }
        }
        if lookup.default_deadline <= lookup.upstream_time_reserve {
            return Err(ConfigError::invalid(
                "lookup.default_deadline",
                "must be longer than lookup.upstream_time_reserve",
            ));
        }
        // The cron schedules (refresh.sweep, audit.prune) are parsed as the
        // file is read, with the scheduler's own parser.
        let mut declared_apps = HashSet::new();
        for (index, app) in self.apps.iter().enumerate() {
            if !declared_apps.insert(&app.client_key) {
                return Err(ConfigError::invalid(
                    format!("apps[{index}].client_key"),
                    "the same app is declared twice",
                ));
            }
            if app.client_secret_file.is_some() == app.client_secret_env.is_some() {
                return Err(ConfigError::invalid(
                    format!("apps[{index}].client_secret_file"),
                    "give exactly one of client_secret_file and client_secret_env",
                ));
            }
        }
        self.resolve_clients()?;
        let mut declared_merchants = HashSet::new();
        for (index, merchant) in self.merchants.iter().enumerate() {
            if !declared_merchants.insert(&merchant.account_id) {
                return Err(ConfigError::invalid(
                    format!("merchants[{index}].account_id"),
                    "the same merchant is declared twice",
                ));
            }
            if !declared_apps.contains(&merchant.client_key) {
                return Err(ConfigError::invalid(
                    format!("merchants[{index}].client_key"),
                    "names no app declared under [[apps]]",
                ));
            }
        }
        Ok(())
    }

    /// `database` and what goes with it: a password file only for PostgreSQL,
    /// and with PostgreSQL no declarations in the file. Daemons sharing one
    /// database each sync their own file at start and on reload, and a sync
    /// removes what the file no longer declares: two files that differ would
    /// undo each other's apps, merchants and clients, so with PostgreSQL they
    /// are managed through AdminService, whose writes every daemon sees.
    fn validate_database(&self) -> Result<(), ConfigError> {
        match &self.database {
            DatabaseSetting::Sqlite(_) => {
                if self.database_password_file.is_some() {
                    return Err(ConfigError::invalid(
                        "database_password_file",
                        "only a PostgreSQL database takes a password; database names a SQLite file",
                    ));
                }
                if self.cluster.is_some() {
                    return Err(ConfigError::invalid(
                        "cluster",
                        "only daemons sharing a PostgreSQL database form a cluster; database names a SQLite file, which one daemon owns",
                    ));
                }
            }
            DatabaseSetting::Postgres(_) => {
                let declared = [
                    ("apps", self.apps.is_empty()),
                    ("merchants", self.merchants.is_empty()),
                    ("clients", self.clients.is_empty()),
                ];
                if let Some((key, _)) = declared.iter().find(|(_, empty)| !empty) {
                    return Err(ConfigError::invalid(
                        *key,
                        "with a PostgreSQL database the config file declares no apps, merchants or clients — every daemon sharing the database would sync its own file over the others'; manage them with AdminService (douyin-tokend app add …) and create the first admin client with `douyin-tokend client bootstrap`",
                    ));
                }
                self.validate_cluster()?;
            }
        }
        Ok(())
    }

    /// `[cluster]`: a fetch lease and a longest reconnect delay within bounds
    /// (see [`FETCH_LEASE_BOUNDS`] and [`RECONNECT_BACKOFF_MAX_BOUND`] for why).
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let cluster = self.cluster_settings();
        let (shortest_lease, longest_lease) = FETCH_LEASE_BOUNDS;
        if !(shortest_lease..=longest_lease).contains(&cluster.fetch_lease) {
            return Err(ConfigError::invalid(
                "cluster.fetch_lease",
                format!(
                    "must be between {} and {}: shorter, a healthy fetch outlives its lease and another daemon fetches beside it; longer, callers wait that long for a daemon that died mid-fetch",
                    humantime::format_duration(shortest_lease),
                    humantime::format_duration(longest_lease)
                ),
            ));
        }
        if !(CLUSTER_RECONNECT_FIRST..=RECONNECT_BACKOFF_MAX_BOUND)
            .contains(&cluster.reconnect_backoff_max)
        {
            return Err(ConfigError::invalid(
                "cluster.reconnect_backoff_max",
                format!(
                    "must be between {} (the first reconnect delay) and {}",
                    humantime::format_duration(CLUSTER_RECONNECT_FIRST),
                    humantime::format_duration(RECONNECT_BACKOFF_MAX_BOUND)
                ),
            ));
        }
        Ok(())
    }

    /// The `[cluster]` settings, defaults where the file has none.
    pub fn cluster_settings(&self) -> ClusterConfig {
        self.cluster.clone().unwrap_or_default()
    }

    /// `[webhook]`: a path Douyin can post to, a listener of its own, a sane
    /// body bound, TLS files that exist (proven whole by `app::check_tls_files`).
    fn validate_webhook(&self) -> Result<(), ConfigError> {
        let webhook = &self.webhook;
        let path_is_plain = webhook.path.starts_with('/')
            && webhook
                .path
                .bytes()
                .all(|byte| byte.is_ascii_graphic() && !matches!(byte, b'?' | b'#' | b'%'));
        if !path_is_plain {
            return Err(ConfigError::invalid(
                "webhook.path",
                "must start with '/' and hold printable ASCII without '?', '#' or '%', like /douyin/webhook",
            ));
        }
        if webhook.retention.is_zero() {
            return Err(ConfigError::invalid(
                "webhook.retention",
                "must be above zero",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&webhook.max_body_bytes) {
            return Err(ConfigError::invalid(
                "webhook.max_body_bytes",
                "must be between 1024 and 16777216 (a notification is well under 4 KiB)",
            ));
        }
        if let Some(listen) = webhook.listen
            && listen.port() != 0
        {
            let grpc_port = match &self.listen {
                ListenAddress::Tcp(address) => Some(address.port()),
                ListenAddress::Unix(_) => None,
            };
            let metrics_port = self.metrics_listen.map(|address| address.port());
            if grpc_port == Some(listen.port()) || metrics_port == Some(listen.port()) {
                return Err(ConfigError::invalid(
                    "webhook.listen",
                    "needs a port of its own (listen and metrics_listen use this one)",
                ));
            }
        }
        if let Some(tls) = &webhook.tls {
            if tls.client_ca_file.is_some() {
                return Err(ConfigError::invalid(
                    "webhook.tls.client_ca_file",
                    "Douyin presents no client certificate; leave it out",
                ));
            }
            tls.check_files_exist("webhook.tls")?;
        }
        Ok(())
    }

    /// Reads every declared app's secret. Relative secret files resolve against
    /// `credentials_directory` (systemd's `$CREDENTIALS_DIRECTORY`) when given.
    pub(crate) fn resolve_apps(
        &self,
        lookup_env: impl Fn(&str) -> Option<String>,
        credentials_directory: Option<&Path>,
    ) -> Result<Vec<ResolvedApp>, ConfigError> {
        self.apps
            .iter()
            .enumerate()
            .map(|(index, app)| {
                let (key, raw_secret) = match (&app.client_secret_file, &app.client_secret_env) {
                    (Some(file), _) => {
                        let key = format!("apps[{index}].client_secret_file");
                        let path = credential_file_path(file, credentials_directory);
                        let text = read_secret_file(&key, &path)?;
                        (key, text)
                    }
                    (None, Some(variable)) => {
                        let key = format!("apps[{index}].client_secret_env");
                        let text = lookup_env(variable).ok_or_else(|| {
                            ConfigError::invalid(
                                &key,
                                format!("environment variable {variable} is not set"),
                            )
                        })?;
                        (key, text)
                    }
                    (None, None) => {
                        return Err(ConfigError::invalid(
                            format!("apps[{index}].client_secret_file"),
                            "give exactly one of client_secret_file and client_secret_env",
                        ));
                    }
                };
                let client_secret = ClientSecret::parse(trim_line_end(&raw_secret))
                    .map_err(|error| ConfigError::invalid(key, error.to_string()))?;
                Ok(ResolvedApp {
                    client_key: app.client_key.clone(),
                    client_secret,
                })
            })
            .collect()
    }

    /// The declared API clients, held to the rules every client keeps.
    pub(crate) fn resolve_clients(&self) -> Result<Vec<ApiClient>, ConfigError> {
        let mut names = HashSet::new();
        // One key authenticates one client: a second entry with the same hash
        // would make the caller's scopes depend on which entry is found first.
        let mut key_hashes = HashSet::new();
        self.clients
            .iter()
            .enumerate()
            .map(|(index, client)| {
                let declared = ApiClient::declare(
                    &client.name,
                    client.key_sha256,
                    client.scopes.clone(),
                    client.apps.clone(),
                    client.merchants.clone(),
                )
                .map_err(|error| {
                    ConfigError::invalid(
                        format!("clients[{index}].{}", error.field()),
                        error.to_string(),
                    )
                })?;
                if !names.insert(declared.name.clone()) {
                    return Err(ConfigError::invalid(
                        format!("clients[{index}].name"),
                        "the same client is declared twice",
                    ));
                }
                if !key_hashes.insert(client.key_sha256.to_hex()) {
                    return Err(ConfigError::invalid(
                        format!("clients[{index}].key_sha256"),
                        "another client already has this key; each client needs a key of its own",
                    ));
                }
                Ok(declared)
            })
            .collect()
    }

    /// Everything the file declares for the registry, checked, with the apps'
    /// secrets read (relative secret files in `credentials_directory`).
    pub fn resolve_declarations(
        &self,
        lookup_env: impl Fn(&str) -> Option<String>,
        credentials_directory: Option<&Path>,
    ) -> Result<Declarations, ConfigError> {
        Ok(Declarations {
            apps: self.resolve_apps(lookup_env, credentials_directory)?,
            merchants: self.merchants.clone(),
            clients: self.resolve_clients()?,
        })
    }

    /// The SQLite file, when `database` names one (tools and tests that work
    /// on the file itself: copies, lock files, its owner).
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.database {
            DatabaseSetting::Sqlite(path) => Some(path),
            DatabaseSetting::Postgres(_) => None,
        }
    }

    /// What the store opens: the SQLite file, or the PostgreSQL URL with its
    /// password read from `database_password_file` (relative: in
    /// `credentials_directory`) or else the credential `database-password`
    /// when it exists; no password at all is fine (peer or certificate
    /// authentication; sqlx still reads `PGPASSWORD` and `~/.pgpass`).
    /// check-config calls it too, so a password file that cannot be read
    /// fails there exactly as it would at start.
    pub fn database_location(
        &self,
        credentials_directory: Option<&Path>,
    ) -> Result<DatabaseLocation, ConfigError> {
        let url = match &self.database {
            DatabaseSetting::Sqlite(path) => return Ok(DatabaseLocation::Sqlite(path.clone())),
            DatabaseSetting::Postgres(url) => url,
        };
        let password_path = match (&self.database_password_file, credentials_directory) {
            (Some(file), _) => Some(credential_file_path(file, credentials_directory)),
            (None, Some(credentials)) => Some(credentials.join(DATABASE_PASSWORD_CREDENTIAL))
                .filter(|credential| credential.exists()),
            (None, None) => None,
        };
        let password = match password_path {
            Some(path) => {
                let text = read_secret_file("database_password_file", &path)?;
                let password = trim_line_end(&text);
                if password.is_empty() {
                    return Err(ConfigError::invalid(
                        "database_password_file",
                        format!("{} is empty", path.display()),
                    ));
                }
                Some(password.to_owned())
            }
            None => None,
        };
        Ok(DatabaseLocation::Postgres(PostgresDatabase {
            url: url.as_str().to_owned(),
            password,
        }))
    }

    /// Where the master key lives (see `master_key_file`). With SQLite this
    /// always has an answer (beside the database, at worst). A PostgreSQL
    /// database has no directory beside it, and every daemon sharing it needs
    /// the same key, so there the key file must be named: absolute, in
    /// `credentials_directory`, or the credential `master-key`; else a
    /// config error on `master_key_file`.
    pub fn master_key_path(
        &self,
        credentials_directory: Option<&Path>,
    ) -> Result<PathBuf, ConfigError> {
        let beside_database = self.sqlite_path().map(|database| {
            database
                .parent()
                .map_or_else(PathBuf::new, Path::to_path_buf)
        });
        let default_credential = credentials_directory
            .map(|credentials| credentials.join("master-key"))
            .filter(|credential| credential.exists());
        match (&self.master_key_file, default_credential, beside_database) {
            (Some(file), _, _) if file.is_absolute() || credentials_directory.is_some() => {
                Ok(credential_file_path(file, credentials_directory))
            }
            (Some(file), _, Some(beside_database)) => Ok(beside_database.join(file)),
            (Some(file), _, None) => Err(ConfigError::invalid(
                "master_key_file",
                format!(
                    "{} is relative and $CREDENTIALS_DIRECTORY is not set; a PostgreSQL database has no directory beside it to look in, so give an absolute path (every daemon sharing the database needs the same key file)",
                    file.display()
                ),
            )),
            (None, Some(credential), _) => Ok(credential),
            (None, None, Some(beside_database)) => Ok(beside_database.join("master.key")),
            (None, None, None) => Err(ConfigError::invalid(
                "master_key_file",
                "with a PostgreSQL database it must be set (an absolute path, or a file in $CREDENTIALS_DIRECTORY such as the credential master-key): there is no directory beside the database to keep it in, and every daemon sharing the database needs the same key file",
            )),
        }
    }

    /// Reads the master key file when there is one, so that a malformed key
    /// (not 64 hex digits, not even text) or an unreadable file is a config
    /// error naming `master_key_file`, exit 64 from check-config and serve
    /// alike, rather than a failure of the store at start (exit 1). A missing
    /// file is fine here: a new database gets a new key, and the store
    /// refuses to make one up for a database that already has one.
    pub fn check_master_key_file(
        &self,
        credentials_directory: Option<&Path>,
    ) -> Result<(), ConfigError> {
        let path = self.master_key_path(credentials_directory)?;
        if !path.exists() {
            return Ok(());
        }
        crate::sealing::MasterKey::read(&path)
            .map(drop)
            .map_err(|error| ConfigError::invalid("master_key_file", error.to_string()))
    }
}

/// A file named in the config: relative paths are looked up in
/// `credentials_directory` (systemd's `$CREDENTIALS_DIRECTORY`, where
/// `LoadCredential=` puts them) when it is given, else where the daemon runs.
fn credential_file_path(file: &Path, credentials_directory: Option<&Path>) -> PathBuf {
    match credentials_directory {
        Some(directory) if file.is_relative() => directory.join(file),
        _ => file.to_path_buf(),
    }
}

/// The text of a secret file. A file that cannot be read is a config error
/// naming `key`; the message says why (the I/O error) but never quotes the
/// file, so no part of a secret reaches a log.
fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| {
        ConfigError::invalid(key, format!("cannot read {}: {error}", path.display()))
    })
}

/// A secret as written to its file: the line end editors add is not part of it.
fn trim_line_end(text: &str) -> &str {
    text.trim_end_matches(['\r', '\n'])
}

/// `key: message (line L, column C)`. The key is serde's path to the value
/// when there is one; for a syntax error, the key written on the offending
/// line inside its table.
fn describe_toml_error(text: &str, path: Option<String>, error: &toml::de::Error) -> String {
    let position = error.span().map(|span| span.start.min(text.len()));
    let key = path
        .filter(|path| !path.is_empty() && path != ".")
        .or_else(|| position.and_then(|position| key_written_at(text, position)))
        .unwrap_or_else(|| "config".to_owned());
    let message = error.message().trim_end();
    // TOML has no leading-zero integers: `unix_socket_mode = 0660` fails to parse.
    let hint = if message.contains("leading zero") {
        " (TOML writes octal as 0o660; or quote it: \"0660\")"
    } else {
        ""
    };
    let message = format!("{message}{hint}");
    let message = message.as_str();
    // A missing field's path is its table; name the field itself.
    let key = match message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        Some(field) if key == "config" => field.to_owned(),
        Some(field) => format!("{key}.{field}"),
        None => key,
    };
    match position {
        Some(position) => {
            let line = text[..position].matches('\n').count() + 1;
            let column = position
                - text[..position]
                    .rfind('\n')
                    .map_or(0, |newline| newline + 1)
                + 1;
            format!("{key}: {message} (line {line}, column {column})")
        }
        None => format!("{key}: {message}"),
    }
}

/// The dotted key written on the line holding `position`, prefixed with the
/// table it is in (`[refresh]`, or `apps[2]` for the third `[[apps]]`).
fn key_written_at(text: &str, position: usize) -> Option<String> {
    let mut table = String::new();
    let mut array_counts: std::collections::HashMap<String, usize> = Default::default();
    let line_start = text[..position]
        .rfind('\n')
        .map_or(0, |newline| newline + 1);
    for line in text[..line_start].lines() {
        let line = line.trim();
        if let Some(name) = line
            .strip_prefix("[[")
            .and_then(|rest| rest.split("]]").next())
        {
            let name = name.trim().to_owned();
            let count = array_counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{count}]");
            *count += 1;
        } else if let Some(name) = line
            .strip_prefix('[')
            .and_then(|rest| rest.split(']').next())
        {
            table = name.trim().to_owned();
        }
    }
    let line = text[line_start..].lines().next().unwrap_or_default();
    let key = line.split('=').next().map(str::trim).filter(|key| {
        line.contains('=') && !key.is_empty() && !key.starts_with('[') && !key.starts_with('#')
    });
    match (key, table.is_empty()) {
        (Some(key), true) => Some(key.to_owned()),
        (Some(key), false) => Some(format!("{table}.{key}")),
        (None, false) => Some(table),
        (None, true) => None,
    }
}

/// Durations written the humane way (`90s`, `25m`, `2h 5m`).
mod humane_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|error| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration like \"90s\" or \"25m\": {error}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        let unix = Config::from_toml_str("listen = \"unix:/run/x.sock\"").unwrap();
        assert_eq!(
            unix.listen,
            ListenAddress::Unix(PathBuf::from("/run/x.sock"))
        );
        assert!(Config::from_toml_str("listen = \"unix:relative.sock\"").is_err());
        // The form the CLI's --daemon takes is accepted for listen too.
        let named = Config::from_toml_str("listen = \"localhost:50051\"").unwrap();
        assert_eq!(named.listen.to_string(), "127.0.0.1:50051");
        assert!(Config::from_toml_str("listen = \"localhost\"").is_err());
        let octal = Config::from_toml_str("unix_socket_mode = 0o640").unwrap();
        assert_eq!(octal.unix_socket_mode.bits(), 0o640);
        let leading_zero = Config::from_toml_str("unix_socket_mode = 0660").unwrap_err();
        assert!(leading_zero.contains("unix_socket_mode"), "{leading_zero}");
        assert!(leading_zero.contains("0o660"), "{leading_zero}");
        assert!(Config::from_toml_str("unix_socket_mode = 0o1777").is_err());
        assert!(Config::from_toml_str("listen = \"localhost:port\"").is_err());
        assert_eq!(config.douyin.base_url, "https://open.douyin.com");
        assert_eq!(config.refresh.window_start, Duration::from_secs(1500));
        assert_eq!(config.refresh.window_end, Duration::from_secs(900));
        assert_eq!(config.refresh.min_interval, Duration::from_secs(300));
        assert_eq!(
            config.refresh.sweep.as_ref().map(CronSchedule::as_str),
            Some("*/15 * * * * *")
        );
        assert_eq!(config.audit.prune.as_str(), "0 17 * * * *");
        assert_eq!(config.unix_socket_mode.bits(), 0o660);
        config.validate().unwrap();
    }

    #[test]
    fn the_example_config_parses_and_validates() {
        let text = include_str!("../config.example.toml");
        let config = Config::from_toml_str(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.apps.len(), 1);
        assert_eq!(config.merchants.len(), 1);
    }

    #[test]
    fn humane_durations_and_unknown_keys() {
        let config =
            Config::from_toml_str("[refresh]\nwindow_start = \"1h 5m\"\nwindow_end = \"90s\"")
                .unwrap();
        assert_eq!(config.refresh.window_start, Duration::from_secs(3900));
        assert_eq!(config.refresh.window_end, Duration::from_secs(90));
        let error = Config::from_toml_str("[refresh]\nwindow_begin = \"1m\"").unwrap_err();
        assert!(error.contains("window_begin"), "{error}");
        let error = Config::from_toml_str("[refresh]\nwindow_end = \"soon\"").unwrap_err();
        assert!(error.contains("soon"), "{error}");
    }

    #[test]
    fn validation_names_the_offending_key() {
        let cases = [
            (
                "[refresh]\nwindow_start = \"10m\"\nwindow_end = \"15m\"",
                "refresh.window_start",
            ),
            ("[douyin]\nbase_url = \"ftp://example\"", "douyin.base_url"),
            (
                "[[apps]]\nclient_key = \"k\"\n[[merchants]]\naccount_id = \"1\"\nclient_key = \"other\"",
                "apps[0].client_secret_file",
            ),
            (
                "[[apps]]\nclient_key = \"k\"\nclient_secret_env = \"S\"\n[[merchants]]\naccount_id = \"1\"\nclient_key = \"other\"",
                "merchants[0].client_key",
            ),
            (
                "[lookup.rates.after_sale_order_list]\nper_app = { awslow = 1 }",
                "lookup.rates.after_sale_order_list.per_app",
            ),
        ];
        for (text, key) in cases {
            let error = Config::from_toml_str(text).unwrap().validate().unwrap_err();
            assert!(error.to_string().starts_with(key), "{text}: {error}");
        }
    }

    #[test]
    fn schedules_rates_and_modes_are_typed_as_the_file_is_read() {
        let off = Config::from_toml_str("[refresh]\nsweep = \"off\"").unwrap();
        assert_eq!(off.refresh.sweep, None);
        let typed = Config::from_toml_str(
            "unix_socket_mode = \"0600\"\n[audit]\nprune = \"0 0 3 * * *\"\n\
             [lookup.rates.after_sale_order_detail]\nper_second = 4\nper_app = { awslow = 1 }",
        )
        .unwrap();
        assert_eq!(typed.unix_socket_mode.bits(), 0o600);
        assert_eq!(typed.unix_socket_mode.to_string(), "0600");
        assert_eq!(typed.audit.prune.as_str(), "0 0 3 * * *");
        let detail = DouyinApi::AfterSaleOrderDetail;
        let slow = ClientKey::parse("awslow").unwrap();
        let other = ClientKey::parse("awother").unwrap();
        assert_eq!(typed.lookup.rate_per_second(detail, &slow).get(), 1);
        assert_eq!(typed.lookup.rate_per_second(detail, &other).get(), 4);
        // The APIs not listed run at their documented rates.
        assert_eq!(
            typed
                .lookup
                .rate_per_second(DouyinApi::AfterSaleOrderList, &other)
                .get(),
            10
        );
        assert_eq!(
            typed
                .lookup
                .rate_per_second(DouyinApi::AfterSaleOrderAudit, &other)
                .get(),
            5
        );
        let cases = [
            ("[refresh]\nsweep = \"*/5 * * * *\"", "refresh.sweep"),
            ("[refresh]\nsweep = \"a b c d e f\"", "refresh.sweep"),
            ("[refresh]\nsweep = \"99 * * * * *\"", "refresh.sweep"),
            ("[audit]\nprune = \"x y z 1 2 3\"", "audit.prune"),
            ("unix_socket_mode = \"0999\"", "unix_socket_mode"),
            ("unix_socket_mode = \"1777\"", "unix_socket_mode"),
            (
                "[lookup.rates.after_sale_order_detail]\nper_second = 0",
                "lookup.rates.after_sale_order_detail.per_second",
            ),
            (
                "[lookup.rates.after_sale_order_detail]\nper_app = { awslow = 0 }",
                "lookup.rates.after_sale_order_detail.per_app.awslow",
            ),
            ("[lookup.rates.order_list]\nper_second = 1", "lookup.rates"),
            (
                "[[clients]]\nname = \"a\"\nkey_sha256 = \"00\"\nscopes = [\"admin\"]",
                "clients[0].key_sha256",
            ),
            (
                "[[clients]]\nname = \"a\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nscopes = [\"root\"]",
                "clients[0].scopes",
            ),
            (
                "[[merchants]]\naccount_id = \"1 2\"\nclient_key = \"a\"",
                "merchants[0].account_id",
            ),
        ];
        for (text, key) in cases {
            let error = Config::from_toml_str(text).unwrap_err();
            assert!(error.starts_with(key), "{text}: {error}");
        }
    }

    #[test]
    fn the_webhook_is_off_by_default_and_its_settings_are_checked() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config.webhook.listen, None);
        assert_eq!(config.webhook.path, "/douyin/webhook");
        assert_eq!(
            config.webhook.retention,
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(config.webhook.max_body_bytes, 64 * 1024);
        let on = Config::from_toml_str(
            "[webhook]\nlisten = \"127.0.0.1:8443\"\npath = \"/hooks/douyin\"\nretention = \"7d\"",
        )
        .unwrap();
        on.validate().unwrap();
        assert_eq!(on.webhook.listen.unwrap().port(), 8443);
        let parse_errors = [
            ("[webhook]\nlisten = \"unix:/run/x.sock\"", "webhook.listen"),
            ("[webhook]\nlisten = \"nowhere\"", "webhook.listen"),
            ("[webhook]\nretention = \"soon\"", "webhook.retention"),
            ("[webhook]\nsecret = \"x\"", "webhook"),
        ];
        for (text, key) in parse_errors {
            let error = Config::from_toml_str(text).unwrap_err();
            assert!(error.starts_with(key), "{text}: {error}");
        }
        let invalid = [
            ("[webhook]\npath = \"douyin\"", "webhook.path"),
            ("[webhook]\npath = \"/a b\"", "webhook.path"),
            ("[webhook]\npath = \"/a?b=1\"", "webhook.path"),
            ("[webhook]\nretention = \"0s\"", "webhook.retention"),
            ("[webhook]\nmax_body_bytes = 10", "webhook.max_body_bytes"),
            (
                "listen = \"127.0.0.1:7000\"\n[webhook]\nlisten = \"0.0.0.0:7000\"",
                "webhook.listen",
            ),
            (
                "metrics_listen = \"127.0.0.1:9100\"\n[webhook]\nlisten = \"127.0.0.1:9100\"",
                "webhook.listen",
            ),
            (
                "[webhook]\nlisten = \"127.0.0.1:8443\"\ntls = { cert_file = \"/nonexistent/cert.pem\", key_file = \"/nonexistent/key.pem\" }",
                "webhook.tls.cert_file",
            ),
            (
                "[webhook]\ntls = { cert_file = \"Cargo.toml\", key_file = \"Cargo.toml\", client_ca_file = \"Cargo.toml\" }",
                "webhook.tls.client_ca_file",
            ),
        ];
        for (text, key) in invalid {
            let error = Config::from_toml_str(text).unwrap().validate().unwrap_err();
            assert!(error.to_string().starts_with(key), "{text}: {error}");
        }
    }

    #[test]
    fn clients_keep_the_rules_every_client_keeps() {
        let hash = KeyHash::of_key("k").to_hex();
        let client = |name: &str, scopes: &str| {
            format!(
                "[[clients]]\nname = \"{name}\"\nkey_sha256 = \"{hash}\"\nscopes = [{scopes}]\n"
            )
        };
        let cases = [
            (client("", "\"admin\""), "clients[0].name"),
            (client(&"n".repeat(65), "\"admin\""), "clients[0].name"),
            (client("a", ""), "clients[0].scopes"),
            (
                client("a", "\"admin\"") + &client(" a ", "\"admin\""),
                "clients[1].name",
            ),
            (
                client("a", "\"admin\"") + &client("b", "\"token.read\""),
                "clients[1].key_sha256",
            ),
        ];
        for (text, key) in cases {
            let error = Config::from_toml_str(&text)
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(error.to_string().starts_with(key), "{text}: {error}");
        }
        let declared = Config::from_toml_str(&client("ops", "\"token.read\", \"admin\""))
            .unwrap()
            .resolve_clients()
            .unwrap();
        assert_eq!(declared[0].name, "ops");
        assert_eq!(declared[0].key_hash, KeyHash::of_key("k"));
        assert_eq!(declared[0].scopes, [Scope::TokenRead, Scope::Admin].into());
    }

    #[test]
    fn a_malformed_master_key_file_is_a_config_error_naming_the_key() {
        let directory = tempfile::tempdir().unwrap();
        let config = Config {
            database: DatabaseSetting::Sqlite(directory.path().join("tokend.db")),
            ..Config::default()
        };
        config.check_master_key_file(None).unwrap();
        let key_file = config.master_key_path(None).unwrap();
        // 64 bytes that are not 64 characters: once a panic (exit 101).
        std::fs::write(
            &key_file,
            format!("{}é{}\n", "a".repeat(31), "b".repeat(31)),
        )
        .unwrap();
        let error = config.check_master_key_file(None).unwrap_err();
        assert!(
            error.to_string().starts_with("master_key_file: "),
            "{error}"
        );
        std::fs::write(&key_file, [0xff, 0xfe, 0x00]).unwrap();
        let error = config.check_master_key_file(None).unwrap_err();
        assert!(
            error.to_string().starts_with("master_key_file: "),
            "{error}"
        );
        std::fs::remove_file(&key_file).unwrap();
        crate::sealing::MasterKey::generate()
            .write_new(&key_file)
            .unwrap();
        config.check_master_key_file(None).unwrap();
    }

    /// A PostgreSQL config with a master key named, so the tests below see
    /// only what they are about.
    fn postgres_config(extra: &str) -> Result<Config, String> {
        Config::from_toml_str(&format!(
            "database = \"postgres://tokend@db.example:5432/tokend\"\nmaster_key_file = \"/etc/douyin-tokend/master.key\"\n{extra}"
        ))
    }

    /// The error of a `database_location` expected to fail, as it prints
    /// (`DatabaseLocation` has no `Debug` for `unwrap_err`).
    fn location_error(result: Result<DatabaseLocation, ConfigError>) -> String {
        match result {
            Ok(location) => panic!("expected an error, got {location}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn a_postgres_url_selects_postgresql_and_anything_else_is_a_sqlite_path() {
        for url in [
            "postgres://tokend@db.example:5432/tokend?sslmode=verify-full",
            "postgresql://tokend@db.example/tokend",
            "postgres:///tokend?host=/run/postgresql&user=tokend",
            "postgres:///tokend%2Done?host=/tmp/pg%20test&port=5433&user=tokend",
            "postgres://db.example?dbname=tokend&user=tokend",
        ] {
            let config = Config::from_toml_str(&format!("database = \"{url}\"")).unwrap();
            let DatabaseSetting::Postgres(parsed) = &config.database else {
                panic!("{url} is not PostgreSQL: {:?}", config.database);
            };
            assert_eq!(parsed.as_str(), url, "the URL is kept as written");
            assert_eq!(config.sqlite_path(), None);
            assert_eq!(config.database.to_string(), url);
        }
        let sqlite = Config::from_toml_str("database = \"/var/lib/x/tokend.db\"").unwrap();
        assert_eq!(
            sqlite.database,
            DatabaseSetting::Sqlite(PathBuf::from("/var/lib/x/tokend.db"))
        );
        assert_eq!(
            sqlite.sqlite_path(),
            Some(Path::new("/var/lib/x/tokend.db"))
        );
        let relative = Config::from_toml_str("database = \"postgres.db\"").unwrap();
        assert_eq!(relative.sqlite_path(), Some(Path::new("postgres.db")));
        // The default stays the SQLite file it always was.
        assert_eq!(
            default_database_path(Some(std::ffi::OsStr::new("/var/lib/douyin-tokend"))),
            PathBuf::from("/var/lib/douyin-tokend/tokend.db")
        );
        assert!(matches!(
            Config::default().database,
            DatabaseSetting::Sqlite(_)
        ));
        let location = sqlite.database_location(None).unwrap();
        assert!(
            matches!(&location, DatabaseLocation::Sqlite(path) if path == Path::new("/var/lib/x/tokend.db")),
            "{location}"
        );
        // The environment override reads the same two forms.
        let mut config = Config::default();
        config
            .apply_environment(|name| {
                (name == "DOUYIN_TOKEND_DATABASE").then(|| "postgres://h/tokend".to_owned())
            })
            .unwrap();
        assert_eq!(config.database.to_string(), "postgres://h/tokend");
        let error = config
            .apply_environment(|name| {
                (name == "DOUYIN_TOKEND_DATABASE").then(|| "postgres://u:pw@h/tokend".to_owned())
            })
            .unwrap_err();
        assert!(
            error.to_string().starts_with("DOUYIN_TOKEND_DATABASE: "),
            "{error}"
        );
    }

    #[test]
    fn a_postgres_url_with_a_password_or_without_a_database_is_refused() {
        for url in [
            "postgres://tokend:hunter2@db.example/tokend",
            "postgresql://tokend:hunter2@db.example:5432/tokend?sslmode=require",
            "postgres://tokend@db.example/tokend?password=hunter2",
        ] {
            let error = Config::from_toml_str(&format!("database = \"{url}\"")).unwrap_err();
            assert!(error.starts_with("database: "), "{error}");
            assert!(error.contains("database_password_file"), "{error}");
            assert!(error.contains("database-password"), "{error}");
            assert!(
                !error.contains("hunter2"),
                "the password is never printed: {error}"
            );
        }
        for url in [
            "postgres://tokend@db.example",
            "postgres://tokend@db.example:5432/",
            "postgres:///?host=/run/postgresql",
            "postgres://db.example/?dbname=",
        ] {
            let error = Config::from_toml_str(&format!("database = \"{url}\"")).unwrap_err();
            assert!(error.starts_with("database: "), "{error}");
            assert!(error.contains("names no database"), "{error}");
        }
        let error =
            Config::from_toml_str("database = \"postgres://db.example:port/x\"").unwrap_err();
        assert!(error.starts_with("database: "), "{error}");
    }

    #[test]
    fn the_database_password_comes_from_a_file_or_the_credential() {
        let credentials = tempfile::tempdir().unwrap();
        std::fs::write(credentials.path().join("pg-password"), "from-file\n").unwrap();
        let password_of = |config: &Config, credentials_directory: Option<&Path>| match config
            .database_location(credentials_directory)
            .unwrap()
        {
            DatabaseLocation::Postgres(database) => database.password,
            DatabaseLocation::Sqlite(path) => panic!("SQLite {}", path.display()),
        };
        // Relative: in $CREDENTIALS_DIRECTORY, the trailing newline dropped.
        let named = postgres_config("database_password_file = \"pg-password\"").unwrap();
        named.validate().unwrap();
        assert_eq!(
            password_of(&named, Some(credentials.path())).as_deref(),
            Some("from-file")
        );
        // Absolute: as written.
        let absolute = postgres_config(&format!(
            "database_password_file = \"{}\"",
            credentials.path().join("pg-password").display()
        ))
        .unwrap();
        assert_eq!(password_of(&absolute, None).as_deref(), Some("from-file"));
        // Not named: the credential database-password when it is there, else none.
        let unnamed = postgres_config("").unwrap();
        assert_eq!(password_of(&unnamed, Some(credentials.path())), None);
        assert_eq!(password_of(&unnamed, None), None);
        std::fs::write(
            credentials.path().join("database-password"),
            "credential\r\n",
        )
        .unwrap();
        assert_eq!(
            password_of(&unnamed, Some(credentials.path())).as_deref(),
            Some("credential")
        );
        // A named file that cannot be read, or holds nothing, names the key.
        let missing = postgres_config("database_password_file = \"absent\"").unwrap();
        let error = location_error(missing.database_location(Some(credentials.path())));
        assert!(
            error.starts_with("database_password_file: cannot read "),
            "{error}"
        );
        std::fs::write(credentials.path().join("empty"), "\n").unwrap();
        let empty = postgres_config("database_password_file = \"empty\"").unwrap();
        let error = location_error(empty.database_location(Some(credentials.path())));
        assert!(error.starts_with("database_password_file: "), "{error}");
        // SQLite takes no password.
        let sqlite = Config::from_toml_str("database_password_file = \"pg-password\"").unwrap();
        let error = sqlite.validate().unwrap_err();
        assert!(
            error.to_string().starts_with("database_password_file: "),
            "{error}"
        );
    }

    #[test]
    fn the_database_password_never_shows_in_debug_output_or_errors() {
        let credentials = tempfile::tempdir().unwrap();
        let password = "s3cret-database-password";
        std::fs::write(credentials.path().join("database-password"), password).unwrap();
        let config = postgres_config("").unwrap();
        let DatabaseLocation::Postgres(database) =
            config.database_location(Some(credentials.path())).unwrap()
        else {
            panic!("PostgreSQL expected");
        };
        assert_eq!(database.password.as_deref(), Some(password));
        assert!(!format!("{database:?}").contains(password), "{database:?}");
        let location = DatabaseLocation::Postgres(database);
        assert!(!location.to_string().contains(password), "{location}");
        assert!(!format!("{config:?}").contains(password));
        // Errors about the file say why it was refused, never what it holds.
        let sqlite = Config::from_toml_str(&format!(
            "database_password_file = \"{}\"",
            credentials.path().join("database-password").display()
        ))
        .unwrap();
        let error = sqlite.validate().unwrap_err().to_string();
        assert!(!error.contains(password), "{error}");
        std::fs::write(
            credentials.path().join("not-text"),
            [b"s3cret".as_slice(), &[0xff, 0xfe]].concat(),
        )
        .unwrap();
        let not_text = postgres_config("database_password_file = \"not-text\"").unwrap();
        let error = location_error(not_text.database_location(Some(credentials.path())));
        assert!(error.starts_with("database_password_file: "), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn with_postgresql_the_file_declares_no_apps_merchants_or_clients() {
        let hash = KeyHash::of_key("k").to_hex();
        let cases = [
            (
                "[[apps]]\nclient_key = \"a\"\nclient_secret_env = \"S\"\n\
                 [[merchants]]\naccount_id = \"1\"\nclient_key = \"a\"",
                "apps",
            ),
            (
                "[[merchants]]\naccount_id = \"1\"\nclient_key = \"a\"",
                "merchants",
            ),
            (
                &*format!(
                    "[[clients]]\nname = \"ops\"\nkey_sha256 = \"{hash}\"\nscopes = [\"admin\"]"
                ),
                "clients",
            ),
        ];
        for (declarations, key) in cases {
            // The same declarations are fine with SQLite (merchants alone
            // fail there for naming no declared app, a different key).
            if key != "merchants" {
                Config::from_toml_str(declarations)
                    .unwrap()
                    .validate()
                    .unwrap();
            }
            let error = postgres_config(declarations)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(error.starts_with(&format!("{key}: ")), "{error}");
            assert!(error.contains("AdminService"), "{error}");
            assert!(error.contains("douyin-tokend client bootstrap"), "{error}");
        }
        postgres_config("").unwrap().validate().unwrap();
    }

    #[test]
    fn the_cluster_table_is_for_postgresql_and_its_timing_is_bounded() {
        // Absent: the defaults the cluster always had.
        let defaults = postgres_config("").unwrap();
        defaults.validate().unwrap();
        assert_eq!(defaults.cluster_settings(), ClusterConfig::default());
        assert_eq!(
            defaults.cluster_settings().fetch_lease,
            Duration::from_secs(8)
        );
        assert_eq!(
            defaults.cluster_settings().reconnect_backoff_max,
            Duration::from_secs(10)
        );
        let tuned =
            postgres_config("[cluster]\nfetch_lease = \"2s\"\nreconnect_backoff_max = \"1s\"")
                .unwrap();
        tuned.validate().unwrap();
        assert_eq!(tuned.cluster_settings().fetch_lease, Duration::from_secs(2));
        assert_eq!(
            tuned.cluster_settings().reconnect_backoff_max,
            Duration::from_secs(1)
        );
        // The bounds themselves are accepted.
        postgres_config("[cluster]\nfetch_lease = \"1s\"\nreconnect_backoff_max = \"250ms\"")
            .unwrap()
            .validate()
            .unwrap();
        postgres_config("[cluster]\nfetch_lease = \"60s\"\nreconnect_backoff_max = \"5m\"")
            .unwrap()
            .validate()
            .unwrap();
        let refused = [
            ("[cluster]\nfetch_lease = \"999ms\"", "cluster.fetch_lease"),
            ("[cluster]\nfetch_lease = \"61s\"", "cluster.fetch_lease"),
            (
                "[cluster]\nreconnect_backoff_max = \"249ms\"",
                "cluster.reconnect_backoff_max",
            ),
            (
                "[cluster]\nreconnect_backoff_max = \"301s\"",
                "cluster.reconnect_backoff_max",
            ),
        ];
        for (table, key) in refused {
            let error = postgres_config(table)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(error.starts_with(&format!("{key}: ")), "{table}: {error}");
        }
        let unknown = postgres_config("[cluster]\nlease = \"8s\"").unwrap_err();
        assert!(unknown.contains("cluster.lease"), "{unknown}");
        // One daemon owns a SQLite file: there is no cluster to tune.
        let sqlite = Config::from_toml_str("[cluster]\nfetch_lease = \"8s\"")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(sqlite.starts_with("cluster: "), "{sqlite}");
        assert!(sqlite.contains("SQLite"), "{sqlite}");
    }

    #[test]
    fn with_postgresql_the_master_key_file_must_be_named() {
        let credentials = tempfile::tempdir().unwrap();
        let unnamed = Config::from_toml_str("database = \"postgres://h/tokend\"").unwrap();
        // No file named, no credential: there is no "beside the database".
        for credentials_directory in [None, Some(credentials.path())] {
            let error = unnamed
                .master_key_path(credentials_directory)
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("master_key_file: "), "{error}");
            assert!(error.contains("PostgreSQL"), "{error}");
            let error = unnamed
                .check_master_key_file(credentials_directory)
                .unwrap_err();
            assert!(
                error.to_string().starts_with("master_key_file: "),
                "{error}"
            );
        }
        // The credential master-key, when loaded.
        std::fs::write(credentials.path().join("master-key"), "x").unwrap();
        assert_eq!(
            unnamed.master_key_path(Some(credentials.path())).unwrap(),
            credentials.path().join("master-key")
        );
        // Absolute: as written, with or without $CREDENTIALS_DIRECTORY.
        let absolute = postgres_config("").unwrap();
        for credentials_directory in [None, Some(credentials.path())] {
            assert_eq!(
                absolute.master_key_path(credentials_directory).unwrap(),
                PathBuf::from("/etc/douyin-tokend/master.key")
            );
        }
        // Relative: only in $CREDENTIALS_DIRECTORY.
        let relative = Config::from_toml_str(
            "database = \"postgres://h/tokend\"\nmaster_key_file = \"cluster-key\"",
        )
        .unwrap();
        assert_eq!(
            relative.master_key_path(Some(credentials.path())).unwrap(),
            credentials.path().join("cluster-key")
        );
        let error = relative.master_key_path(None).unwrap_err().to_string();
        assert!(error.starts_with("master_key_file: "), "{error}");
        assert!(error.contains("absolute"), "{error}");
        // SQLite keeps its rules: beside the database unless named otherwise.
        let sqlite = Config::from_toml_str("database = \"/var/lib/x/tokend.db\"").unwrap();
        assert_eq!(
            sqlite.master_key_path(None).unwrap(),
            PathBuf::from("/var/lib/x/master.key")
        );
        assert_eq!(
            sqlite.master_key_path(Some(credentials.path())).unwrap(),
            credentials.path().join("master-key")
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut config = Config::default();
        config
            .apply_environment(|name| match name {
                "DOUYIN_TOKEND_LISTEN" => Some("127.0.0.1:6000".to_owned()),
                "DOUYIN_TOKEND_DOUYIN_BASE_URL" => Some("http://127.0.0.1:7000".to_owned()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:6000");
        assert_eq!(config.douyin.base_url, "http://127.0.0.1:7000");
        let error = config
            .apply_environment(|name| {
                (name == "DOUYIN_TOKEND_LISTEN").then(|| "nowhere".to_owned())
            })
            .unwrap_err();
        assert!(error.to_string().starts_with("DOUYIN_TOKEND_LISTEN"));
    }

    #[test]
    fn secrets_come_from_files_in_the_credentials_directory_or_the_environment() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("app-secret"), "from-file\n").unwrap();
        let config = Config::from_toml_str(
            "[[apps]]\nclient_key = \"a\"\nclient_secret_file = \"app-secret\"\n\
             [[apps]]\nclient_key = \"b\"\nclient_secret_env = \"B_SECRET\"",
        )
        .unwrap();
        let apps = config
            .resolve_apps(
                |name| (name == "B_SECRET").then(|| "from-env".to_owned()),
                Some(directory.path()),
            )
            .unwrap();
        assert_eq!(apps[0].client_secret.expose(), "from-file");
        assert_eq!(apps[1].client_secret.expose(), "from-env");
        let error = config
            .resolve_apps(|_| None, Some(directory.path()))
            .unwrap_err();
        assert!(
            error.to_string().starts_with("apps[1].client_secret_env"),
            "{error}"
        );
    }
}
