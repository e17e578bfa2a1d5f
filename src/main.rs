//! The `douyin-tokend` process: parses the command line, loads the config,
//! sets up logging, binds the listeners, turns signals into shutdown (SIGTERM,
//! SIGINT) and reloads (SIGHUP), runs the chosen command and turns its outcome
//! into an exit code (64 for a bad config, 69 for a daemon the CLI cannot
//! reach, 1 for any other failure).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use douyin_tokend::app::{App, ServeOptions};
use douyin_tokend::cli::{self, Cli, Command};
use douyin_tokend::clock::{SharedClock, SystemClock};
use douyin_tokend::config::{Config, ConfigError};
use douyin_tokend::sandbox::{Sandbox, SandboxConfig};
use douyin_tokend::store::{DatabaseLocation, Store, StoreError};
use douyin_tokend::systemd_notify::SystemdNotifier;
use douyin_tokend::telemetry;
use douyin_tokend::transport::DaemonUnreachable;
use futures::stream::StreamExt;

/// sysexits' EX_USAGE / EX_CONFIG family: the operator must fix the config.
const EXIT_BAD_CONFIG: u8 = 64;
/// sysexits' EX_UNAVAILABLE: a client command found no daemon to talk to (or
/// could not speak to it), which a script may retry; a refusal from the
/// daemon stays 1.
const EXIT_DAEMON_UNREACHABLE: u8 = 69;

/// mimalloc instead of glibc's malloc: a gRPC call allocates and frees many
/// small buffers across threads, and glibc's malloc (with its consolidation)
/// was about a tenth of the daemon's CPU under load.
#[global_allocator]
static GLOBAL_ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Err(flag) = cli.apply_leading_flags() {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!("{flag} does not apply to this command"),
            )
            .exit();
    }
    let default_filter = match cli.command {
        Command::Serve { .. } | Command::Sandbox(_) => "info,tokio_cron_scheduler=warn,sqlx=warn",
        _ => "warn",
    };
    telemetry::init_logging(cli.log_format, default_filter);
    // `serve` reads its file before the runtime exists, since the file says
    // how many threads the runtime gets; a refusal is reported by `run`.
    let serve_config = match &cli.command {
        Command::Serve { config_file } => Some(Config::load(config_file.config.as_deref())),
        _ => None,
    };
    let worker_threads = match &serve_config {
        Some(Ok(config)) => config.worker_threads,
        _ => 1,
    };
    // One thread unless the file asks for more: the cheapest per call (see
    // `Config::worker_threads`), and plenty for every other command.
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(worker_threads);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let log_format = cli.log_format;
    match runtime.block_on(run(cli, serve_config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let needs_a_changed_setting = error.downcast_ref::<ConfigError>().is_some()
                || error
                    .downcast_ref::<StoreError>()
                    .is_some_and(StoreError::needs_a_changed_setting);
            let exit_code: u8 = if needs_a_changed_setting {
                EXIT_BAD_CONFIG
            } else if error.downcast_ref::<DaemonUnreachable>().is_some() {
                EXIT_DAEMON_UNREACHABLE
            } else {
                1
            };
            match log_format {
                // One more JSON line for the log pipeline, not a line of
                // prose it cannot parse (the exit code as a number).
                cli::LogFormat::Json => tracing::error!(
                    error = %format!("{error:#}"),
                    exit_code,
                    "douyin-tokend stopped with an error"
                ),
                cli::LogFormat::Human => eprintln!("error: {error:#}"),
            }
            ExitCode::from(exit_code)
        }
    }
}

async fn run(cli: Cli, serve_config: Option<Result<Config, ConfigError>>) -> anyhow::Result<()> {
    match &cli.command {
        Command::Serve { config_file } => {
            let config = serve_config.expect("main loads the file of `serve`")?;
            serve(config, config_file.config.clone()).await
        }
        Command::CheckConfig {
            config_file,
            credentials_directory,
        } => {
            let config = Config::load(config_file.config.as_deref())?;
            let declarations = config.resolve_declarations(
                |name| std::env::var(name).ok(),
                credentials_directory.as_deref(),
            )?;
            config.check_master_key_file(credentials_directory.as_deref())?;
            if let DatabaseLocation::Postgres(database) =
                config.database_location(credentials_directory.as_deref())?
            {
                let master_key_path = config.master_key_path(credentials_directory.as_deref())?;
                Store::check_postgres(&database, &master_key_path).await?;
            }
            douyin_tokend::app::check_tls_files(&config)?;
            douyin_tokend::app::check_watchdog_feed(
                &config,
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
            )?;
            let declared_apps: std::collections::HashSet<_> = declarations
                .apps
                .iter()
                .map(|app| app.client_key())
                .collect();
            for key in config
                .lookup
                .per_app_rates_for_unknown_apps(|client_key| declared_apps.contains(client_key))
            {
                eprintln!(
                    "warning: {key}: this file declares no such app; the rate applies only while an app of that client_key is registered through AdminService"
                );
            }
            println!(
                "config is valid: {} app(s) with readable secrets, {} merchant(s), {} API client(s)",
                declarations.apps.len(),
                declarations.merchants.len(),
                declarations.clients.len()
            );
            Ok(())
        }
        Command::Healthcheck {
            service,
            timeout,
            daemon,
        } => {
            let address = daemon_address(daemon)?;
            print!(
                "{}",
                cli::healthcheck(&address, &daemon.transport()?, service, *timeout).await?
            );
            Ok(())
        }
        Command::Reload { daemon } => {
            let address = reload_address(&daemon.connection)?;
            let output =
                with_admin_client(daemon, address, async |client| cli::reload(client).await)
                    .await?;
            print!("{output}");
            Ok(())
        }
        Command::RotateMasterKey { config_file } => {
            let config = Config::load(config_file.config.as_deref())?;
            let rotation = douyin_tokend::app::rotate_master_key(&config).await?;
            println!(
                "re-sealed {} values under a new master key, now in {}; back it up",
                rotation.values_resealed,
                rotation.key_file.display()
            );
            Ok(())
        }
        Command::Demo => {
            let mut stdout = std::io::stdout().lock();
            douyin_tokend::demo::run(&mut stdout).await
        }
        Command::Sandbox(arguments) => run_sandbox(arguments).await,
        Command::Client { command } => run_client(command).await,
        Command::App { command, daemon } => {
            print_admin_answer(daemon, async |client| {
                cli::run_app_command(client, command).await
            })
            .await
        }
        Command::Merchant { command, daemon } => {
            print_admin_answer(daemon, async |client| {
                cli::run_merchant_command(client, command).await
            })
            .await
        }
        Command::Token { command, daemon } => {
            print_admin_answer(daemon, async |client| {
                cli::run_token_command(client, command).await
            })
            .await
        }
        Command::Events { command, daemon } => {
            let api_key = daemon.api_key()?;
            let address = daemon_address(&daemon.connection)?;
            let transport = daemon.connection.transport()?;
            let mut stdout = std::io::stdout();
            cli::tail_events(&address, &transport, &api_key, command, &mut stdout).await
        }
        Command::Audit { command, daemon } => {
            print_admin_answer(daemon, async |client| {
                cli::run_audit_command(client, command).await
            })
            .await
        }
    }
}

/// `client …`: `new-key` and `bootstrap` need no daemon; the others call one.
async fn run_client(command: &cli::ClientCommand) -> anyhow::Result<()> {
    let daemon = match command {
        cli::ClientCommand::NewKey => {
            print_output(&cli::new_key());
            return Ok(());
        }
        cli::ClientCommand::Bootstrap { name, config_file } => {
            let config = Config::load(config_file.config.as_deref())?;
            print_output(&douyin_tokend::app::bootstrap_admin_client(&config, name).await?);
            return Ok(());
        }
        cli::ClientCommand::Create { daemon, .. }
        | cli::ClientCommand::List { daemon, .. }
        | cli::ClientCommand::Remove { daemon, .. } => daemon,
    };
    let address = daemon_address(&daemon.connection)?;
    let output = with_admin_client(daemon, address, async |client| {
        cli::run_client_command(client, command).await
    })
    .await?;
    print_output(&output);
    Ok(())
}

type AdminClient = douyin_tokend::proto::tokend::v1::admin_service_client::AdminServiceClient<
    cli::AuthenticatedChannel,
>;

/// Connects to AdminService at `address` with the key `daemon` names and
/// runs `work` with it. A connection that fails, while connecting or under a
/// call, comes back as one sentence naming `address`.
async fn with_admin_client<Answer>(
    daemon: &cli::AdminConnection,
    address: String,
    work: impl AsyncFnOnce(&mut AdminClient) -> anyhow::Result<Answer>,
) -> anyhow::Result<Answer> {
    let api_key = daemon.api_key()?;
    let transport = daemon.connection.transport()?;
    let answer = async {
        let mut client = cli::admin_client(&address, &transport, &api_key).await?;
        work(&mut client).await
    }
    .await;
    answer.map_err(|error| cli::name_the_daemon(error, &address, &transport))
}

/// Runs an admin command against the daemon `daemon` names and prints its answer.
async fn print_admin_answer(
    daemon: &cli::AdminConnection,
    work: impl AsyncFnOnce(&mut AdminClient) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let address = daemon_address(&daemon.connection)?;
    print!("{}", with_admin_client(daemon, address, work).await?);
    Ok(())
}

/// `--daemon` (or DOUYIN_TOKEND_ADDRESS), else `listen` from the config file.
fn daemon_address(daemon: &cli::DaemonConnection) -> anyhow::Result<String> {
    match &daemon.daemon {
        Some(address) => Ok(address.clone()),
        None => Ok(Config::load(daemon.config.as_deref())?.listen.to_string()),
    }
}

/// The daemon's address for `reload`. A config file too broken to name it is
/// the very failure the reload must report; under systemd (`ExecReload=`
/// sets `$MAINPID`) the daemon also gets SIGHUP, so its STATUS and log record
/// the failed reload as they do when asked over gRPC.
fn reload_address(daemon: &cli::DaemonConnection) -> anyhow::Result<String> {
    daemon_address(daemon).map_err(|error| {
        let Ok(main_pid) = std::env::var("MAINPID") else {
            return error;
        };
        let signalled = std::process::Command::new("kill")
            .args(["-HUP", main_pid.trim()])
            .status()
            .is_ok_and(|status| status.success());
        if signalled {
            error.context("configuration not reloaded (the daemon got SIGHUP to record it)")
        } else {
            error
        }
    })
}

async fn serve(config: Config, config_path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let notifier = SystemdNotifier::from_environment();
    // Handlers first: a signal during start-up is then handled, not fatal.
    let shutdown = shutdown_signal()?;
    let reload_requests = reload_signal()?;
    let clock: SharedClock = Arc::new(SystemClock);
    // Everything that can be refused is refused before the database or a
    // master key is created: the TLS files, then the listeners (a port in use
    // must not leave a new database behind).
    douyin_tokend::app::check_tls_files(&config)?;
    douyin_tokend::app::check_watchdog_feed(
        &config,
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
    )?;
    let listener =
        douyin_tokend::transport::Listener::bind(&config.listen, config.unix_socket_mode).await?;
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for metrics on {address}"))?,
        ),
        None => None,
    };
    let webhook_listener = match config.webhook.listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for the webhook on {address}"))?,
        ),
        None => None,
    };
    let app = App::start(config, clock).await?;
    let served = async {
        let options = ServeOptions {
            metrics_listener,
            webhook_listener,
            notifier,
            reload_requests: Some(reload_requests),
            config_path,
            reload_key_file: reload_key_file(),
        };
        app.serve_with(listener, options, shutdown).await
    }
    .await;
    app.close().await;
    match &served {
        Ok(()) => tracing::info!("stopped"),
        Err(error) => tracing::error!(error = %format!("{error:#}"), "stopped after a failure"),
    }
    served
}

/// `$RUNTIME_DIRECTORY/reload.key` under systemd (`RuntimeDirectory=`; the
/// first directory when the unit names several), where the unit's
/// `ExecReload=` finds the daemon's reload key; none outside systemd.
fn reload_key_file() -> Option<std::path::PathBuf> {
    let directories = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = std::env::split_paths(&directories).next()?;
    (!first.as_os_str().is_empty()).then(|| first.join("reload.key"))
}

/// Completes on SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}

/// One item per SIGHUP.
fn reload_signal() -> anyhow::Result<futures::stream::BoxStream<'static, ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    Ok(futures::stream::unfold(hangup, |mut hangup| async move {
        hangup.recv().await.map(|()| ((), hangup))
    })
    .boxed())
}

async fn run_sandbox(arguments: &cli::SandboxArgs) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    let listener = tokio::net::TcpListener::bind(arguments.listen).await?;
    let config = SandboxConfig {
        token_lifetime: arguments.token_lifetime,
        grace: arguments.grace,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::start_on(listener, clock, config)?;
    for app in &arguments.apps {
        let (key, secret) = app
            .split_once(':')
            .context("--app takes CLIENT_KEY:CLIENT_SECRET")?;
        sandbox.state().add_app(key, secret);
    }
    for merchant in &arguments.merchants {
        let (account, key) = merchant
            .split_once(':')
            .context("--merchant takes ACCOUNT_ID:CLIENT_KEY")?;
        sandbox.state().authorize_merchant(account, key);
    }
    tracing::info!(url = %sandbox.base_url(), "sandbox Douyin listening");
    shutdown_signal()?.await;
    sandbox.stop().await;
    Ok(())
}

/// A command's output: what scripts capture on stdout, the prose on stderr.
fn print_output(output: &cli::CommandOutput) {
    eprint!("{}", output.stderr);
    print!("{}", output.stdout);
}
