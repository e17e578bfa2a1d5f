//! The command line: subcommands, and the admin commands that talk to a
//! running daemon's AdminService and print what it answers.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::proto::tokend::v1::admin_service_client::AdminServiceClient;
use crate::proto::tokend::v1::*;

#[derive(Debug, Parser)]
#[command(
    name = "douyin-tokend",
    version,
    about = "Owns Douyin client tokens and serves the after-sale order detail lookup over gRPC"
)]
pub struct Cli {
    /// Log format on stderr (the error a command fails with too).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub leading: LeadingFlags,
    #[command(subcommand)]
    pub command: Command,
}

/// The flags that were global until they moved to the commands that use them,
/// still taken before the command (hidden from help), so scripts and unit
/// drop-ins written as `douyin-tokend --config F serve` keep working. Given
/// there, a flag wins over its environment variable, as it did.
#[derive(Debug, Default, clap::Args)]
pub struct LeadingFlags {
    /// `--config` of the command that follows.
    #[arg(long = "config", id = "leading_config", hide = true)]
    pub config: Option<PathBuf>,
    /// `--api-key-file` of the command that follows.
    #[arg(long = "api-key-file", id = "leading_api_key_file", hide = true)]
    pub api_key_file: Option<PathBuf>,
    /// `--tls-ca-file` of the command that follows.
    #[arg(long = "tls-ca-file", id = "leading_tls_ca_file", hide = true)]
    pub tls_ca_file: Option<PathBuf>,
    /// `--tls-cert-file` of the command that follows.
    #[arg(long = "tls-cert-file", id = "leading_tls_cert_file", hide = true)]
    pub tls_cert_file: Option<PathBuf>,
    /// `--tls-key-file` of the command that follows.
    #[arg(long = "tls-key-file", id = "leading_tls_key_file", hide = true)]
    pub tls_key_file: Option<PathBuf>,
}

/// Where a command keeps each flag `LeadingFlags` may carry (`None`: the
/// command takes no such flag).
#[derive(Default)]
struct FlagSlots<'a> {
    config: Option<&'a mut Option<PathBuf>>,
    api_key_file: Option<&'a mut Option<PathBuf>>,
    tls_ca_file: Option<&'a mut Option<PathBuf>>,
    tls_cert_file: Option<&'a mut Option<PathBuf>>,
    tls_key_file: Option<&'a mut Option<PathBuf>>,
}

impl<'a> FlagSlots<'a> {
    fn of_config(config_file: &'a mut ConfigFile) -> Self {
        Self {
            config: Some(&mut config_file.config),
            ..Self::default()
        }
    }

    fn of_connection(connection: &'a mut DaemonConnection) -> Self {
        let DaemonConnection {
            config,
            tls_ca_file,
            tls_cert_file,
            tls_key_file,
            ..
        } = connection;
        Self {
            config: Some(config),
            api_key_file: None,
            tls_ca_file: Some(tls_ca_file),
            tls_cert_file: Some(tls_cert_file),
            tls_key_file: Some(tls_key_file),
        }
    }

    fn of_admin(admin: &'a mut AdminConnection) -> Self {
        Self {
            api_key_file: Some(&mut admin.api_key_file),
            ..Self::of_connection(&mut admin.connection)
        }
    }
}

impl Cli {
    /// Moves the flags given before the command into the command; the flag
    /// named in the error is one the command does not take.
    pub fn apply_leading_flags(&mut self) -> Result<(), &'static str> {
        let leading = std::mem::take(&mut self.leading);
        let slots = match &mut self.command {
            Command::Serve { config_file }
            | Command::RotateMasterKey { config_file }
            | Command::CheckConfig { config_file, .. }
            | Command::Client {
                command: ClientCommand::Bootstrap { config_file, .. },
            } => FlagSlots::of_config(config_file),
            Command::Healthcheck { daemon, .. } => FlagSlots::of_connection(daemon),
            Command::Reload { daemon }
            | Command::App { daemon, .. }
            | Command::Merchant { daemon, .. }
            | Command::Token { daemon, .. }
            | Command::Audit { daemon, .. }
            | Command::Events { daemon, .. }
            | Command::Client {
                command:
                    ClientCommand::Create { daemon, .. }
                    | ClientCommand::List { daemon, .. }
                    | ClientCommand::Remove { daemon, .. },
            } => FlagSlots::of_admin(daemon),
            Command::Demo
            | Command::Sandbox(_)
            | Command::Client {
                command: ClientCommand::NewKey,
            } => FlagSlots::default(),
        };
        let moves = [
            ("--config", leading.config, slots.config),
            ("--api-key-file", leading.api_key_file, slots.api_key_file),
            ("--tls-ca-file", leading.tls_ca_file, slots.tls_ca_file),
            (
                "--tls-cert-file",
                leading.tls_cert_file,
                slots.tls_cert_file,
            ),
            ("--tls-key-file", leading.tls_key_file, slots.tls_key_file),
        ];
        for (flag, value, slot) in moves {
            match (value, slot) {
                (None, _) => {}
                (Some(value), Some(slot)) => *slot = Some(value),
                (Some(_), None) => return Err(flag),
            }
        }
        Ok(())
    }
}

/// `--config` for the commands that read the whole file (serve, check-config,
/// rotate-master-key, client bootstrap). Not global: `sandbox`, `demo` and
/// `client new-key` read no config, so their help must not offer one.
#[derive(Debug, clap::Args)]
pub struct ConfigFile {
    /// The TOML config file (defaults apply when absent).
    #[arg(long, env = "DOUYIN_TOKEND_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        #[command(flatten)]
        config_file: ConfigFile,
    },
    /// Run a sandbox Douyin and the daemon on a throwaway database, register a
    /// demo merchant, look up an after-sale order through gRPC and print it.
    Demo,
    /// Run the sandbox Douyin upstream on its own (for manual testing).
    Sandbox(SandboxArgs),
    /// Re-seal the database's secrets and tokens under a new master key and
    /// replace the key file. Stop the daemon first.
    RotateMasterKey {
        #[command(flatten)]
        config_file: ConfigFile,
    },
    /// Validate the config file and exit (64 when it is invalid, with a
    /// message naming the offending key).
    CheckConfig {
        #[command(flatten)]
        config_file: ConfigFile,
        /// Where relative `client_secret_file`s live (systemd's
        /// `$CREDENTIALS_DIRECTORY`); every app's secret is read to check it.
        #[arg(long, env = "CREDENTIALS_DIRECTORY")]
        credentials_directory: Option<PathBuf>,
    },
    /// Ask the running daemon to re-read its config file and apply its apps,
    /// merchants and API clients (as SIGHUP does), and print what changed.
    /// Exits 1 with the reason when the file cannot be applied (nothing
    /// changes then). The unit's ExecReload= runs it, with the key the daemon
    /// writes for it; operators need a key with the admin or config.reload scope.
    Reload {
        #[command(flatten)]
        daemon: AdminConnection,
    },
    /// Ask a running daemon's grpc.health.v1 service; exit 0 only when it
    /// answers SERVING.
    Healthcheck {
        /// The service to ask about; the overall status by default.
        #[arg(long, default_value = "")]
        service: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        daemon: DaemonConnection,
    },
    /// Manage the apps (client_key) of a running daemon.
    App {
        #[command(subcommand)]
        command: AppCommand,
        #[command(flatten)]
        daemon: AdminConnection,
    },
    /// Manage the merchants (account_id) of a running daemon.
    Merchant {
        #[command(subcommand)]
        command: MerchantCommand,
        #[command(flatten)]
        daemon: AdminConnection,
    },
    /// Inspect or refresh the tokens of a running daemon.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        daemon: AdminConnection,
    },
    /// Manage the API clients allowed to call a running daemon, or make keys
    /// and the first admin client without one.
    Client {
        // No connection flags here: `new-key` and `bootstrap` talk to no
        // daemon, so each command that does carries them itself.
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Read the audit trail of a running daemon.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        #[command(flatten)]
        daemon: AdminConnection,
    },
    /// Follow the refund-request notifications a running daemon's webhook
    /// stored (needs a key with the aftersale.events scope).
    Events {
        #[command(subcommand)]
        command: EventsCommand,
        #[command(flatten)]
        daemon: AdminConnection,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print stored events after a sequence, then new ones as they arrive,
    /// until interrupted.
    Tail {
        /// Start after this sequence (0: from the oldest kept).
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Only this merchant, by account_id (repeatable).
        #[arg(long = "merchant")]
        merchants: Vec<String>,
        /// One JSON object per line (the app by its client key, no raw body).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create a client on the daemon and print its key, once.
    Create {
        /// The client's name, unique on the daemon.
        name: String,
        /// aftersale.read, aftersale.audit, aftersale.events, token.read, token.report, config.reload or admin (repeatable).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Only this app, by client_key (repeatable).
        #[arg(long = "app")]
        apps: Vec<String>,
        /// Only this merchant, by account_id (repeatable).
        #[arg(long = "merchant")]
        merchants: Vec<String>,
        /// Print one JSON object (the key, name, scopes and bounds) on stdout instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        daemon: AdminConnection,
    },
    /// The API clients, by name.
    List {
        /// Print one JSON document on stdout instead of the table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        daemon: AdminConnection,
    },
    /// Remove an API client (never the last one with the admin scope).
    Remove {
        /// The client's name.
        name: String,
        #[command(flatten)]
        daemon: AdminConnection,
    },
    /// Print a new key and its SHA-256 for a [[clients]] entry in the config
    /// file; needs no daemon.
    NewKey,
    /// Create the first admin client straight in the database named by
    /// --config and print its key (needs no daemon): for daemons sharing a
    /// PostgreSQL database, whose config files declare no clients. Refused
    /// once any admin client exists; add more with `client create`.
    Bootstrap {
        /// The admin client's name.
        name: String,
        #[command(flatten)]
        config_file: ConfigFile,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest audit lines first.
    List {
        /// How many lines to print at most.
        #[arg(long, default_value_t = 50)]
        limit: i32,
        /// Print one JSON document on stdout instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// Where the sandbox Douyin listens (point the daemon's douyin.base_url there).
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: std::net::SocketAddr,
    /// An app the sandbox knows, as CLIENT_KEY:CLIENT_SECRET (repeatable).
    #[arg(long = "app")]
    pub apps: Vec<String>,
    /// A merchant authorised for an app, as ACCOUNT_ID:CLIENT_KEY (repeatable).
    #[arg(long = "merchant")]
    pub merchants: Vec<String>,
    /// Lifetime of issued tokens, e.g. "2h" or "30s".
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    pub token_lifetime: std::time::Duration,
    /// How long a superseded token stays valid.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub grace: std::time::Duration,
}

/// How a command finds and reaches the daemon: its address and the TLS to
/// speak. Only the commands that talk to a daemon flatten it, so `sandbox
/// --help` offers no TLS. The flags are global within the command that
/// flattens them so that both `app --daemon ADDR list` and `app list --daemon
/// ADDR` work.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Daemon connection")]
pub struct DaemonConnection {
    /// The daemon's gRPC address: host:port, https://host:port or
    /// unix:/path (default: `listen` from the config file).
    #[arg(long, global = true, env = "DOUYIN_TOKEND_ADDRESS")]
    pub daemon: Option<String>,
    /// The config file whose `listen` is the daemon's address when --daemon
    /// is not given.
    #[arg(long, global = true, env = "DOUYIN_TOKEND_CONFIG")]
    pub config: Option<PathBuf>,
    /// Speak TLS to the daemon, trusting this CA (PEM).
    #[arg(long, global = true, env = "DOUYIN_TOKEND_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a daemon that requires mutual TLS; give
    /// --tls-key-file with it.
    #[arg(long, global = true, requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, global = true, requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// The name in the daemon's certificate, when it differs from the address's host.
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
}

/// A daemon connection that authenticates: the commands that call
/// AdminService (or the event stream) need an API key; `healthcheck` does not.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Daemon connection")]
pub struct AdminConnection {
    #[command(flatten)]
    pub connection: DaemonConnection,
    /// A file holding the API key (or set DOUYIN_TOKEND_API_KEY to the key itself).
    #[arg(long, global = true, env = "DOUYIN_TOKEND_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Add an app or replace its secret. The secret is read from a file, an
    /// environment variable, or standard input — never from the command line.
    Add {
        /// The app's client_key.
        client_key: String,
        /// Read the client secret from this file.
        #[arg(long, conflicts_with = "client_secret_env")]
        client_secret_file: Option<PathBuf>,
        /// Read the client secret from this environment variable (its name).
        #[arg(long)]
        client_secret_env: Option<String>,
    },
    /// The apps, by client_key, with how many merchants each serves.
    List {
        /// Print one JSON document on stdout instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an app and its token. An app that still serves merchants needs
    /// --cascade; an app the config file declares is removed by editing the file.
    Remove {
        /// The app's client_key.
        client_key: String,
        /// Also remove the merchants the app serves.
        #[arg(long)]
        cascade: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum MerchantCommand {
    /// Add a merchant served by an app, or move it to another app.
    Add {
        /// The merchant's account_id.
        account_id: String,
        /// The app (client_key) whose token serves the merchant.
        #[arg(long)]
        client_key: String,
    },
    /// The merchants, by account_id, with the app serving each.
    List {
        /// Only the merchants of this app.
        #[arg(long)]
        client_key: Option<String>,
        /// Print one JSON document on stdout instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a merchant; its app stays.
    Remove {
        /// The merchant's account_id.
        account_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Token state of every app: expiry, generation, last refresh, last error.
    List {
        /// Print one JSON document on stdout instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a new token for an app now.
    Refresh {
        /// The app's client_key.
        client_key: String,
    },
}

/// Sends `authorization: Bearer <key>` with every call.
#[derive(Clone)]
pub struct BearerAuth {
    header: MetadataValue<Ascii>,
}

impl BearerAuth {
    pub fn new(api_key: &str) -> anyhow::Result<Self> {
        let header = format!("Bearer {}", api_key.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("the API key holds characters a header cannot carry"))?;
        Ok(Self { header })
    }
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("BearerAuth(<redacted>)")
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(request)
    }
}

/// A channel whose calls carry the API key.
pub type AuthenticatedChannel = InterceptedService<Channel, BearerAuth>;

/// The API key for the commands that authenticate: `--api-key-file`, else
/// `DOUYIN_TOKEND_API_KEY`. The error for neither names both, and stands
/// alone: "environment variable not found" after it would only repeat it.
pub fn api_key(file: Option<&PathBuf>) -> anyhow::Result<String> {
    match file {
        Some(path) => Ok(std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the API key from {}", path.display()))?
            .trim()
            .to_owned()),
        None => std::env::var("DOUYIN_TOKEND_API_KEY")
            .ok()
            .filter(|key| !key.trim().is_empty())
            .ok_or_else(|| anyhow::anyhow!("{MISSING_API_KEY}")),
    }
}

/// What a command that needs an API key says when it has none.
const MISSING_API_KEY: &str = "no API key: give --api-key-file or set DOUYIN_TOKEND_API_KEY (a key with the admin scope, or the scope the command needs)";

impl DaemonConnection {
    /// How the CLI reaches the daemon, from the TLS flags.
    pub fn transport(&self) -> anyhow::Result<crate::transport::ClientTransport> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        Ok(crate::transport::ClientTransport {
            ca_pem: self.tls_ca_file.as_ref().map(read).transpose()?,
            identity_pem: match (&self.tls_cert_file, &self.tls_key_file) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            },
            domain: self.tls_domain.clone(),
        })
    }
}

impl AdminConnection {
    /// The API key from --api-key-file or DOUYIN_TOKEND_API_KEY.
    pub fn api_key(&self) -> anyhow::Result<String> {
        api_key(self.api_key_file.as_ref())
    }
}

/// Connects to the daemon's AdminService with an API key.
pub async fn admin_client(
    address: &str,
    transport: &crate::transport::ClientTransport,
    api_key: &str,
) -> anyhow::Result<AdminServiceClient<AuthenticatedChannel>> {
    let channel = crate::transport::connect(address, transport).await?;
    Ok(AdminServiceClient::with_interceptor(
        channel,
        BearerAuth::new(api_key)?,
    ))
}

/// Asks the daemon's health service about `service` ("" for overall); Ok only
/// when it answers SERVING within `timeout`.
pub async fn healthcheck(
    address: &str,
    transport: &crate::transport::ClientTransport,
    service: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    // No answer in time is the daemon being unreachable too: the same
    // sentence, the same exit code.
    let silent = || crate::transport::DaemonUnreachable::silent(address, timeout);
    let channel = tokio::time::timeout(timeout, crate::transport::connect(address, transport))
        .await
        .map_err(|_| silent())??;
    let mut health = HealthClient::new(channel);
    let check = health.check(HealthCheckRequest {
        service: service.to_owned(),
    });
    let answer = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| silent())?
        .map_err(|status| name_the_daemon(status_error(status), address, transport))?
        .into_inner();
    let status = ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown);
    let what = if service.is_empty() {
        "douyin-tokend"
    } else {
        service
    };
    if status == ServingStatus::Serving {
        Ok(format!("{what}: SERVING\n"))
    } else {
        bail!("{what}: {}", status.as_str_name())
    }
}

fn read_secret(file: Option<&PathBuf>, variable: Option<&String>) -> anyhow::Result<String> {
    let raw = match (file, variable) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        (None, Some(variable)) => std::env::var(variable)
            .with_context(|| format!("environment variable {variable} is not set"))?,
        (None, None) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the secret from standard input")?;
            text
        }
    };
    let secret = raw.trim_end_matches(['\r', '\n']).to_owned();
    if secret.is_empty() {
        bail!("the client secret is empty");
    }
    Ok(secret)
}

/// The daemon's answer to a failed call as the CLI's error: its message alone,
/// which already says what went wrong and what to do; the gRPC code's name
/// ("FailedPrecondition") means nothing to an operator at a prompt. A status
/// with no message falls back to the code's description so the error never
/// reads empty. A status tonic made itself because the connection failed
/// (refused, closed, TLS) carries the transport error as its source (the
/// daemon's own refusals arrive over the wire with none); it becomes a
/// `ConnectionFailed`, which the caller who knows the address turns into one
/// sentence naming it (`name_the_daemon`).
fn status_error(status: tonic::Status) -> anyhow::Error {
    if std::error::Error::source(&status).is_some() {
        return anyhow::Error::new(ConnectionFailed(status));
    }
    daemon_message(&status)
}

/// The message of a status the daemon sent (see `status_error`).
fn daemon_message(status: &tonic::Status) -> anyhow::Error {
    let message = status.message().trim();
    if message.is_empty() {
        anyhow::anyhow!("{}", status.code().description())
    } else {
        anyhow::anyhow!("{message}")
    }
}

/// A call that failed on this side of the wire: the connection was refused or
/// closed before the daemon answered. Shown on its own only where no address
/// is known; `name_the_daemon` replaces it with a `DaemonUnreachable`.
#[derive(Debug, thiserror::Error)]
#[error("the connection to the daemon failed ({})", .0.message())]
pub struct ConnectionFailed(tonic::Status);

/// `error` as the CLI shows it: a call whose connection failed becomes one
/// sentence naming `address` and what to try; anything else is kept.
pub fn name_the_daemon(
    error: anyhow::Error,
    address: &str,
    transport: &crate::transport::ClientTransport,
) -> anyhow::Error {
    match error.downcast_ref::<ConnectionFailed>() {
        Some(ConnectionFailed(status)) => {
            let cause = std::error::Error::source(status).unwrap_or(status);
            anyhow::Error::new(crate::transport::DaemonUnreachable::new(
                address, transport, cause,
            ))
        }
        None => error,
    }
}

/// One JSON document on stdout, pretty-printed for a reader and parsed the
/// same by `jq` or a script.
fn json_document(value: &serde_json::Value) -> anyhow::Result<String> {
    Ok(format!("{}\n", serde_json::to_string_pretty(value)?))
}

pub async fn run_app_command(
    client: &mut AdminServiceClient<AuthenticatedChannel>,
    command: &AppCommand,
) -> anyhow::Result<String> {
    Ok(match command {
        AppCommand::Add {
            client_key,
            client_secret_file,
            client_secret_env,
        } => {
            let client_secret =
                read_secret(client_secret_file.as_ref(), client_secret_env.as_ref())?;
            let answer = client
                .put_app(PutAppRequest {
                    client_key: client_key.clone(),
                    client_secret,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if answer.created {
                "app added\n".to_owned()
            } else {
                "app secret replaced\n".to_owned()
            }
        }
        AppCommand::List { json } => {
            let mut apps = client
                .list_apps(ListAppsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .apps;
            apps.sort_by(|left, right| left.client_key.cmp(&right.client_key));
            if *json {
                let entries: Vec<serde_json::Value> = apps
                    .iter()
                    .map(|app| {
                        serde_json::json!({
                            "client_key": app.client_key,
                            "source": app.source,
                            "merchant_count": app.merchant_count,
                        })
                    })
                    .collect();
                return json_document(&serde_json::Value::Array(entries));
            }
            let mut out = format!("{:<40} {:<8} {}\n", "CLIENT_KEY", "SOURCE", "MERCHANTS");
            for app in apps {
                out.push_str(&format!(
                    "{:<40} {:<8} {}\n",
                    app.client_key, app.source, app.merchant_count
                ));
            }
            out
        }
        AppCommand::Remove {
            client_key,
            cascade,
        } => {
            let answer = client
                .remove_app(RemoveAppRequest {
                    client_key: client_key.clone(),
                    cascade: *cascade,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            format!(
                "app removed with {} merchant(s)\n",
                answer.merchants_removed
            )
        }
    })
}

pub async fn run_merchant_command(
    client: &mut AdminServiceClient<AuthenticatedChannel>,
    command: &MerchantCommand,
) -> anyhow::Result<String> {
    Ok(match command {
        MerchantCommand::Add {
            account_id,
            client_key,
        } => {
            let answer = client
                .put_merchant(PutMerchantRequest {
                    account_id: account_id.clone(),
                    client_key: client_key.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if answer.created {
                "merchant added\n".to_owned()
            } else {
                "merchant updated\n".to_owned()
            }
        }
        MerchantCommand::List { client_key, json } => {
            let mut merchants = client
                .list_merchants(ListMerchantsRequest {
                    client_key: client_key.clone().unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .merchants;
            merchants.sort_by(|left, right| left.account_id.cmp(&right.account_id));
            if *json {
                let entries: Vec<serde_json::Value> = merchants
                    .iter()
                    .map(|merchant| {
                        serde_json::json!({
                            "account_id": merchant.account_id,
                            "client_key": merchant.client_key,
                            "source": merchant.source,
                        })
                    })
                    .collect();
                return json_document(&serde_json::Value::Array(entries));
            }
            let mut out = format!("{:<24} {:<40} {}\n", "ACCOUNT_ID", "CLIENT_KEY", "SOURCE");
            for merchant in merchants {
                out.push_str(&format!(
                    "{:<24} {:<40} {}\n",
                    merchant.account_id, merchant.client_key, merchant.source
                ));
            }
            out
        }
        MerchantCommand::Remove { account_id } => {
            client
                .remove_merchant(RemoveMerchantRequest {
                    account_id: account_id.clone(),
                })
                .await
                .map_err(status_error)?;
            "merchant removed\n".to_owned()
        }
    })
}

pub async fn run_token_command(
    client: &mut AdminServiceClient<AuthenticatedChannel>,
    command: &TokenCommand,
) -> anyhow::Result<String> {
    Ok(match command {
        TokenCommand::List { json } => {
            let mut tokens = client
                .list_token_status(ListTokenStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .tokens;
            tokens.sort_by(|left, right| left.client_key.cmp(&right.client_key));
            if *json {
                let entries: Vec<serde_json::Value> =
                    tokens.iter().map(token_status_json).collect();
                return json_document(&serde_json::Value::Array(entries));
            }
            format_token_table(&tokens)
        }
        TokenCommand::Refresh { client_key } => {
            let answer = client
                .refresh_token(RefreshTokenRequest {
                    client_key: client_key.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            format!(
                "token refreshed: generation {}, expires at {}\n",
                answer.generation,
                format_unix_ms(answer.expires_at_unix_ms)
            )
        }
    })
}

/// `reload`: asks the daemon to re-read its config file; Ok with what changed
/// (and any notes), Err with the daemon's reason when nothing was applied.
pub async fn reload(
    client: &mut AdminServiceClient<AuthenticatedChannel>,
) -> anyhow::Result<String> {
    let answer = client
        .reload_config(ReloadConfigRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = format!(
        "configuration reloaded: {}\n",
        crate::reload::summary(&answer)
    );
    for note in answer.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    Ok(out)
}

/// A token's status for `token list --json`: the proto's fields, times as
/// Unix milliseconds (0: never). Holds no token.
fn token_status_json(token: &TokenStatus) -> serde_json::Value {
    serde_json::json!({
        "client_key": token.client_key,
        "state": token.state,
        "generation": token.generation,
        "expires_at_unix_ms": token.expires_at_unix_ms,
        "expires_in_seconds": token.expires_in_seconds,
        "last_refresh_unix_ms": token.last_refresh_unix_ms,
        "refresh_at_unix_ms": token.refresh_at_unix_ms,
        "last_error": token.last_error,
        "last_error_unix_ms": token.last_error_unix_ms,
        "consecutive_failures": token.consecutive_failures,
    })
}

/// The token status table the CLI and the demo print. Holds no token.
pub(crate) fn format_token_table(tokens: &[TokenStatus]) -> String {
    let mut out = format!(
        "{:<28} {:<11} {:>4} {:>10} {:<20} {:<20} {}\n",
        "CLIENT_KEY", "STATE", "GEN", "EXPIRES_IN", "LAST_REFRESH", "NEXT_REFRESH", "LAST_ERROR"
    );
    for token in tokens {
        out.push_str(&format!(
            "{:<28} {:<11} {:>4} {:>9}s {:<20} {:<20} {}\n",
            token.client_key,
            token.state,
            token.generation,
            token.expires_in_seconds,
            format_unix_ms(token.last_refresh_unix_ms),
            format_unix_ms(token.refresh_at_unix_ms),
            if token.last_error.is_empty() {
                "-"
            } else {
                &token.last_error
            },
        ));
    }
    out
}

fn format_unix_ms(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".to_owned();
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// What a command prints: `stdout` holds only what a script captures (a new
/// key alone, so `KEY=$(douyin-tokend client new-key)` works), `stderr` the
/// prose around it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CommandOutput {
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    /// A command whose whole answer is its result (listings, confirmations).
    fn result(text: String) -> Self {
        Self {
            stdout: text,
            stderr: String::new(),
        }
    }
}

/// `client new-key`: a key for a [[clients]] entry, made without a daemon.
pub fn new_key() -> CommandOutput {
    let key = crate::access::generate_api_key();
    let hash = crate::access::KeyHash::of_key(&key).to_hex();
    CommandOutput {
        stdout: format!("{key}\n"),
        stderr: format!(
            "the API key above is not stored anywhere: give it to the service.\n\
             for the config file's [[clients]] entry:\n  key_sha256 = \"{hash}\"\n"
        ),
    }
}

/// Runs a client command against a daemon; `client new-key` needs none (see `new_key`).
pub async fn run_client_command(
    client: &mut AdminServiceClient<AuthenticatedChannel>,
    command: &ClientCommand,
) -> anyhow::Result<CommandOutput> {
    Ok(match command {
        ClientCommand::Create {
            name,
            scopes,
            apps,
            merchants,
            json,
            daemon: _,
        } => {
            let answer = client
                .create_client(CreateClientRequest {
                    name: name.clone(),
                    scopes: scopes.clone(),
                    apps: apps.clone(),
                    merchants: merchants.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if *json {
                // The key sits with what it was made for, so a script that
                // stores it keeps the two together.
                return Ok(CommandOutput {
                    stdout: json_document(&serde_json::json!({
                        "api_key": answer.api_key,
                        "name": name,
                        "scopes": scopes,
                        "apps": apps,
                        "merchants": merchants,
                    }))?,
                    stderr: format!(
                        "client {name:?} created; its API key above is shown this once\n"
                    ),
                });
            }
            CommandOutput {
                stdout: format!("{}\n", answer.api_key),
                stderr: format!("client {name:?} created; its API key above is shown this once\n"),
            }
        }
        ClientCommand::List { json, daemon: _ } => {
            let mut clients = client
                .list_clients(ListClientsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .clients;
            clients.sort_by(|left, right| left.name.cmp(&right.name));
            if *json {
                let entries: Vec<serde_json::Value> = clients
                    .iter()
                    .map(|entry| {
                        serde_json::json!({
                            "name": entry.name,
                            "source": entry.source,
                            "scopes": entry.scopes,
                            "apps": entry.apps,
                            "merchants": entry.merchants,
                        })
                    })
                    .collect();
                return Ok(CommandOutput::result(json_document(
                    &serde_json::Value::Array(entries),
                )?));
            }
            let mut out = format!(
                "{:<24} {:<8} {:<48} {}\n",
                "NAME", "SOURCE", "SCOPES", "BOUNDS"
            );
            for entry in clients {
                let bounds = match (entry.apps.is_empty(), entry.merchants.is_empty()) {
                    (true, true) => "-".to_owned(),
                    _ => {
                        // "every" for an unbounded list, else the ids comma-separated.
                        let list = |ids: &[String]| {
                            if ids.is_empty() {
                                "every".to_owned()
                            } else {
                                ids.join(",")
                            }
                        };
                        format!(
                            "apps {} merchants {}",
                            list(&entry.apps),
                            list(&entry.merchants)
                        )
                    }
                };
                out.push_str(&format!(
                    "{:<24} {:<8} {:<48} {}\n",
                    entry.name,
                    entry.source,
                    entry.scopes.join(","),
                    bounds
                ));
            }
            CommandOutput::result(out)
        }
        ClientCommand::Remove { name, daemon: _ } => {
            client
                .remove_client(RemoveClientRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            CommandOutput::result(format!("client {name:?} removed\n"))
        }
        ClientCommand::NewKey => new_key(),
        ClientCommand::Bootstrap { .. } => anyhow::bail!(
            "client bootstrap writes to the database named by --config directly, not through a daemon"
        ),
    })
}

pub async fn run_audit_command(
    client: &mut AdminServiceClient<AuthenticatedChannel>,
    command: &AuditCommand,
) -> anyhow::Result<String> {
    let AuditCommand::List { limit, json } = command;
    let entries = client
        .list_audit(ListAuditRequest {
            since_unix_ms: 0,
            limit: *limit,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .entries;
    // The daemon answers newest first; both outputs keep its order.
    if *json {
        let entries: Vec<serde_json::Value> = entries
            .iter()
            .map(|entry| {
                serde_json::json!({
                    "at_unix_ms": entry.at_unix_ms,
                    "client": entry.client,
                    "action": entry.action,
                    "app": entry.app,
                    "reason": entry.reason,
                    "token_fingerprint": entry.token_fingerprint,
                    "count": entry.count,
                })
            })
            .collect();
        return json_document(&serde_json::Value::Array(entries));
    }
    let mut out = format!(
        "{:<20} {:<16} {:<15} {:<13} {:<14} {:>5} {}\n",
        "AT", "CLIENT", "ACTION", "APP", "TOKEN", "COUNT", "REASON"
    );
    for entry in entries {
        out.push_str(&format!(
            "{:<20} {:<16} {:<15} {:<13} {:<14} {:>5} {}\n",
            format_unix_ms(entry.at_unix_ms),
            entry.client,
            entry.action,
            entry.app,
            if entry.token_fingerprint.is_empty() {
                "-".to_owned()
            } else {
                format!("token:{}", entry.token_fingerprint)
            },
            entry.count,
            entry.reason
        ));
    }
    Ok(out)
}

/// `events tail`: streams the daemon's after-sale events to `out`, one line
/// each, flushed as they come, until the stream ends (an error naming the
/// sequence to resume after) or the process is interrupted. The app shows by
/// its client key (an identifier; the raw body stays out).
pub async fn tail_events(
    address: &str,
    transport: &crate::transport::ClientTransport,
    api_key: &str,
    command: &EventsCommand,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    use crate::proto::douyin::goodlife::v1::WatchAfterSaleEventsRequest;
    use crate::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;

    let EventsCommand::Tail {
        after,
        merchants,
        json,
    } = command;
    let channel = crate::transport::connect(address, transport).await?;
    let mut client = AfterSaleServiceClient::with_interceptor(channel, BearerAuth::new(api_key)?);
    let mut stream = client
        .watch_after_sale_events(WatchAfterSaleEventsRequest {
            after_sequence: *after,
            account_ids: merchants.clone(),
        })
        .await
        .map_err(|status| name_the_daemon(status_error(status), address, transport))?
        .into_inner();
    let mut last_sequence = *after;
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(()),
            Err(status) => {
                // The daemon's message speaks gRPC (`after_sequence`); an
                // operator at this prompt needs the flag. Past pruned events,
                // resuming means accepting the gap the daemon names.
                use tonic_types::StatusExt;
                let resume_after = status
                    .get_details_error_info()
                    .and_then(|info| info.metadata.get("pruned_through").cloned())
                    .and_then(|pruned_through| pruned_through.parse::<i64>().ok())
                    .unwrap_or(last_sequence);
                // A connection that broke mid-stream is no refusal to
                // connect: it is said as such, with the resume advice.
                let ending = if std::error::Error::source(&status).is_some() {
                    anyhow::anyhow!("the connection to the daemon at {address} broke")
                } else {
                    daemon_message(&status)
                };
                return Err(ending.context(format!(
                    "the event stream ended after sequence {last_sequence}; resume with `douyin-tokend events tail --after {resume_after}`"
                )));
            }
        };
        last_sequence = event.sequence;
        let line = if *json {
            event_json_line(&event)?
        } else {
            event_text_line(&event)
        };
        writeln!(out, "{line}")?;
        out.flush()?;
    }
}

fn event_json_line(
    event: &crate::proto::douyin::goodlife::v1::AfterSaleEvent,
) -> anyhow::Result<String> {
    let mut value = serde_json::to_value(event)?;
    if let Some(object) = value.as_object_mut() {
        object.remove("client_key");
        object.remove("raw_json");
        object.insert(
            "app".to_owned(),
            serde_json::Value::String(event.client_key.clone()),
        );
    }
    Ok(value.to_string())
}

pub(crate) fn event_text_line(
    event: &crate::proto::douyin::goodlife::v1::AfterSaleEvent,
) -> String {
    let reasons = event
        .apply_reason
        .as_ref()
        .map(|reason| format!("{:?}", reason.code))
        .unwrap_or_else(|| "[]".to_owned());
    format!(
        "#{} {} merchant {} order {} certificate {} refund {} reasons {} {} msg {}",
        event.sequence,
        format_unix_ms(event.received_at_unix_ms),
        event.account_id,
        event.order_id,
        if event.certificate_id.is_empty() {
            "-"
        } else {
            &event.certificate_id
        },
        event.refund_amount,
        reasons,
        event.client_key,
        event.msg_id
    )
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    fn parse(arguments: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("douyin-tokend").chain(arguments.iter().copied()))
    }

    /// Every subcommand, nested ones too, with the path that names it.
    fn every_command(
        command: &clap::Command,
        path: String,
        found: &mut Vec<(String, clap::Command)>,
    ) {
        found.push((path.clone(), command.clone()));
        for subcommand in command.get_subcommands() {
            every_command(
                subcommand,
                format!("{path} {}", subcommand.get_name()),
                found,
            );
        }
    }

    fn built_commands() -> Vec<(String, clap::Command)> {
        let mut root = Cli::command();
        root.build();
        let mut found = Vec::new();
        every_command(&root, "douyin-tokend".to_owned(), &mut found);
        found
    }

    /// The flags a command offers (in its help); the hidden ones kept for
    /// old command lines (`LeadingFlags`) are not offered.
    fn flag_names(command: &clap::Command) -> Vec<String> {
        command
            .get_arguments()
            .filter(|argument| !argument.is_hide_set())
            .filter_map(|argument| argument.get_long().map(str::to_owned))
            .collect()
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_and_argument_has_help_text() {
        for (path, command) in built_commands() {
            for argument in command.get_arguments() {
                let name = argument.get_id().as_str();
                if name == "help" || name == "version" {
                    continue;
                }
                assert!(
                    argument.get_help().is_some(),
                    "`{path}`: {name} has no help text"
                );
            }
        }
    }

    #[test]
    fn commands_that_talk_to_no_daemon_offer_no_connection_flags() {
        let connection_flags = [
            "daemon",
            "api-key-file",
            "tls-ca-file",
            "tls-cert-file",
            "tls-key-file",
            "tls-domain",
        ];
        for (path, command) in built_commands() {
            let name = path.trim_start_matches("douyin-tokend ");
            if ![
                "serve",
                "demo",
                "sandbox",
                "rotate-master-key",
                "check-config",
                "client new-key",
                "client bootstrap",
            ]
            .contains(&name)
            {
                continue;
            }
            let flags = flag_names(&command);
            for flag in connection_flags {
                assert!(
                    !flags.iter().any(|own| own == flag),
                    "`{path}` offers --{flag}"
                );
            }
        }
    }

    #[test]
    fn only_the_commands_that_read_a_config_file_offer_config() {
        for (path, command) in built_commands() {
            let name = path.trim_start_matches("douyin-tokend ");
            let offers_config = flag_names(&command).iter().any(|flag| flag == "config");
            // clap's own `help` subcommands take no flags at all.
            if name.split(' ').any(|word| word == "help") {
                continue;
            }
            let reads_config = ![
                "douyin-tokend",
                "demo",
                "sandbox",
                "client",
                "client new-key",
            ]
            .contains(&name);
            assert_eq!(offers_config, reads_config, "`{path}`");
        }
    }

    #[test]
    fn the_commands_that_call_the_daemon_offer_every_connection_flag() {
        for path in [
            "reload",
            "app add",
            "merchant list",
            "token refresh",
            "client create",
            "client list",
            "client remove",
            "audit list",
            "events tail",
        ] {
            let (_, command) = built_commands()
                .into_iter()
                .find(|(full_path, _)| full_path == &format!("douyin-tokend {path}"))
                .unwrap_or_else(|| panic!("no command {path}"));
            let flags = flag_names(&command);
            for flag in [
                "daemon",
                "config",
                "api-key-file",
                "tls-ca-file",
                "tls-cert-file",
                "tls-key-file",
                "tls-domain",
            ] {
                assert!(
                    flags.iter().any(|own| own == flag),
                    "`{path}` lacks --{flag}"
                );
            }
        }
    }

    #[test]
    fn connection_flags_keep_their_environment_variables() {
        let (_, reload) = built_commands()
            .into_iter()
            .find(|(path, _)| path == "douyin-tokend reload")
            .unwrap();
        let environment_of = |flag: &str| {
            reload
                .get_arguments()
                .find(|argument| argument.get_long() == Some(flag))
                .and_then(|argument| argument.get_env())
                .map(|name| name.to_string_lossy().into_owned())
        };
        assert_eq!(
            environment_of("daemon").as_deref(),
            Some("DOUYIN_TOKEND_ADDRESS")
        );
        assert_eq!(
            environment_of("config").as_deref(),
            Some("DOUYIN_TOKEND_CONFIG")
        );
        assert_eq!(
            environment_of("api-key-file").as_deref(),
            Some("DOUYIN_TOKEND_API_KEY_FILE")
        );
        assert_eq!(
            environment_of("tls-ca-file").as_deref(),
            Some("DOUYIN_TOKEND_TLS_CA_FILE")
        );
    }

    #[test]
    fn connection_flags_work_after_the_group_and_after_its_command() {
        for arguments in [
            ["app", "--daemon", "127.0.0.1:9", "list"],
            ["app", "list", "--daemon", "127.0.0.1:9"],
        ] {
            let cli = parse(&arguments).unwrap();
            let Command::App { daemon, .. } = cli.command else {
                panic!("{arguments:?} is not `app`");
            };
            assert_eq!(
                daemon.connection.daemon.as_deref(),
                Some("127.0.0.1:9"),
                "{arguments:?}"
            );
        }
        let cli = parse(&["client", "list", "--api-key-file", "/k", "--json"]).unwrap();
        let Command::Client {
            command: ClientCommand::List { daemon, json },
        } = cli.command
        else {
            panic!("not `client list`");
        };
        assert!(json);
        assert_eq!(daemon.api_key_file, Some(PathBuf::from("/k")));
    }

    #[test]
    fn the_unit_s_exec_reload_line_parses() {
        let cli = parse(&[
            "reload",
            "--config",
            "/etc/douyin-tokend/config.toml",
            "--api-key-file",
            "/run/douyin-tokend/reload.key",
        ])
        .unwrap();
        let Command::Reload { daemon } = cli.command else {
            panic!("not `reload`");
        };
        assert_eq!(
            daemon.connection.config,
            Some(PathBuf::from("/etc/douyin-tokend/config.toml"))
        );
        assert_eq!(
            daemon.api_key_file,
            Some(PathBuf::from("/run/douyin-tokend/reload.key"))
        );
    }

    #[test]
    fn commands_that_need_no_daemon_refuse_its_flags() {
        for arguments in [
            &["sandbox", "--tls-ca-file", "/ca.pem"][..],
            &["demo", "--api-key-file", "/k"],
            &["client", "new-key", "--daemon", "127.0.0.1:9"],
            &["client", "bootstrap", "ops", "--api-key-file", "/k"],
            &["sandbox", "--config", "/c.toml"],
            &["healthcheck", "--api-key-file", "/k"],
        ] {
            let error = parse(arguments).expect_err(&format!("{arguments:?} parsed"));
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{arguments:?}"
            );
        }
    }

    #[test]
    fn the_missing_key_error_names_the_variable_and_the_flag() {
        // The variable is read from the process environment, which tests
        // share: only assert when it is not set for the whole run.
        if std::env::var_os("DOUYIN_TOKEND_API_KEY").is_some() {
            return;
        }
        let message = format!("{:#}", api_key(None).unwrap_err());
        assert!(message.contains("DOUYIN_TOKEND_API_KEY"), "{message}");
        assert!(message.contains("--api-key-file"), "{message}");
        assert!(
            !message.contains("environment variable not found"),
            "{message}"
        );
    }
}
