//! The `douyin-tokend` process: parses the command line, loads the config,
//! sets up logging, runs the chosen command and turns its outcome into an
//! exit code (64 for a bad config).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use douyin_tokend::app::App;
use douyin_tokend::cli::{self, Cli, Command, LogFormat};
use douyin_tokend::clock::{SharedClock, SystemClock};
use douyin_tokend::config::{Config, ConfigError};
use douyin_tokend::sandbox::{Sandbox, SandboxConfig};
use tracing_subscriber::EnvFilter;

/// sysexits' EX_USAGE / EX_CONFIG family: the operator must fix the config.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Serve | Command::Sandbox(_) => "info,tokio_cron_scheduler=warn,sqlx=warn",
        _ => "warn",
    };
    init_logging(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Serve => serve(Config::load(cli.config.as_deref())?).await,
        Command::CheckConfig => {
            Config::load(cli.config.as_deref())?;
            println!("config is valid");
            Ok(())
        }
        Command::RotateMasterKey => {
            let rotation =
                douyin_tokend::app::rotate_master_key(&Config::load(cli.config.as_deref())?)
                    .await?;
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
        Command::Client {
            command: cli::ClientCommand::NewKey,
            ..
        } => {
            print!("{}", cli::new_key_text());
            Ok(())
        }
        Command::App { command, daemon } => {
            let mut client = connect_admin(&cli, daemon).await?;
            print!("{}", cli::run_app_command(&mut client, command).await?);
            Ok(())
        }
        Command::Merchant { command, daemon } => {
            let mut client = connect_admin(&cli, daemon).await?;
            print!("{}", cli::run_merchant_command(&mut client, command).await?);
            Ok(())
        }
        Command::Token { command, daemon } => {
            let mut client = connect_admin(&cli, daemon).await?;
            print!("{}", cli::run_token_command(&mut client, command).await?);
            Ok(())
        }
        Command::Client { command, daemon } => {
            let mut client = connect_admin(&cli, daemon).await?;
            print!("{}", cli::run_client_command(&mut client, command).await?);
            Ok(())
        }
        Command::Audit { command, daemon } => {
            let mut client = connect_admin(&cli, daemon).await?;
            print!("{}", cli::run_audit_command(&mut client, command).await?);
            Ok(())
        }
    }
}

async fn connect_admin(
    cli: &Cli,
    daemon: &cli::DaemonAddress,
) -> anyhow::Result<
    douyin_tokend::proto::tokend::v1::admin_service_client::AdminServiceClient<
        cli::AuthenticatedChannel,
    >,
> {
    let api_key = cli::api_key(cli.api_key_file.as_ref())?;
    cli::admin_client(
        &daemon_address(cli, daemon)?,
        &cli::client_transport(cli)?,
        &api_key,
    )
    .await
}

fn daemon_address(cli: &Cli, daemon: &cli::DaemonAddress) -> anyhow::Result<String> {
    match &daemon.daemon {
        Some(address) => Ok(address.clone()),
        None => Ok(Config::load(cli.config.as_deref())?.listen.to_string()),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    let listen = config.listen.clone();
    let app = App::start(config, clock).await?;
    let listener =
        douyin_tokend::transport::Listener::bind(&listen, &app.config.unix_socket_mode).await?;
    app.serve(listener, shutdown_signal()).await?;
    app.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(terminate) => terminate,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops the daemon");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
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
    shutdown_signal().await;
    sandbox.stop().await;
    Ok(())
}
