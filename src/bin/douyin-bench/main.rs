//! `douyin-bench`: reproducible benchmarks and the soak of douyin-tokend. Each
//! scenario starts a sandbox Douyin in this process, spawns the real
//! `douyin-tokend serve` next to this binary (so the daemon's CPU and memory
//! are read from its own `/proc` entry, apart from the load generator's),
//! drives gRPC load over several connections, and prints a table with the
//! numbers and the machine. BENCHMARKS.md records the commands and results.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/douyin-bench overhead|throughput|tokens|scale|soak|webhook|cluster|all
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use douyin_tokend::app::App;
use douyin_tokend::bench::daemon_process::{DaemonLaunch, DaemonProcess};
use douyin_tokend::bench::fleet::{Fleet, order_id, teach_orders};
use douyin_tokend::bench::measure::{
    Latencies, LatencySummary, Machine, ProcessSample, Table, format_ms, load_average,
};
use douyin_tokend::bench::soak::{self, SoakPlan, SoakReport};
use douyin_tokend::clock::{Clock, ManualClock, SharedClock, SystemClock};
use douyin_tokend::config::Config;
use douyin_tokend::domain::{AccessToken, ClientKey};
use douyin_tokend::douyin::after_sale::{PATH as AFTER_SALE_PATH, decode_after_sale_answer};
use douyin_tokend::proto::douyin::goodlife::v1::GetAfterSaleOrderDetailRequest;
use douyin_tokend::proto::douyin::goodlife::v1::after_sale_service_client::AfterSaleServiceClient;
use douyin_tokend::proto::tokend::v1::GetAccessTokenRequest;
use douyin_tokend::proto::tokend::v1::get_access_token_request::Selector;
use douyin_tokend::proto::tokend::v1::token_service_client::TokenServiceClient;
use douyin_tokend::sandbox::{Fault, Sandbox, SandboxConfig, SandboxState};
use douyin_tokend::store::{NewToken, Store};
use tonic::transport::Channel;

mod cluster;
mod daemon;
mod overhead;
mod scale;
mod soak_scenario;
mod throughput;
mod webhook;

use daemon::*;
use overhead::*;
use scale::*;
use webhook::WebhookArgs;

#[derive(Debug, Parser)]
#[command(
    name = "douyin-bench",
    about = "Benchmarks and soak of douyin-tokend against the sandbox Douyin, on loopback"
)]
struct Cli {
    /// The daemon binary to spawn (default: douyin-tokend next to this binary;
    /// build both with `cargo build --release --bins`).
    #[arg(long, global = true)]
    daemon_binary: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// 1. The same lookups at a fixed rate, straight to the sandbox over HTTP
    ///    and through the daemon over gRPC, interleaved; percentiles of both.
    Overhead(OverheadArgs),
    /// 2. Maximum sustained lookups/s with enough apps that pacing is not the
    ///    limit, and the daemon's CPU time per lookup.
    Throughput(ThroughputArgs),
    /// 3. GetAccessToken requests/s and latency.
    Tokens(TokensArgs),
    /// 4. 10,000 apps and 100,000 merchants: time to ready, resident memory,
    ///    and the token fetch rate over the first simulated hours.
    Scale(ScaleArgs),
    /// 5. Short tokens, steady load, faults and invalidations for minutes;
    ///    token errors, 2119003, fetches against the minimum, memory over time.
    Soak(SoakArgs),
    /// 6. Refund-request notifications: accepted per second (each stored
    ///    before its 200) and webhook → watcher latency at a fixed rate.
    Webhook(WebhookArgs),
    /// 7. Several daemons on one PostgreSQL database (a private server the
    ///    bench starts): lookups and hand-outs against one daemon on SQLite,
    ///    token propagation delay, and failover when the fetching daemon is
    ///    killed.
    Cluster(ClusterArgs),
    /// Every scenario with its default (short) settings, one after another.
    All,
}

#[derive(Debug, Clone, clap::Args)]
struct OverheadArgs {
    /// Lookups per second on each path.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Apps the lookups are spread over (the daemon paces each at 10/s).
    #[arg(long, default_value_t = 200)]
    apps: usize,
    /// gRPC connections to the daemon.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

impl Default for OverheadArgs {
    fn default() -> Self {
        Self {
            rate: 1000,
            seconds: 10,
            warmup_seconds: 2,
            apps: 200,
            connections: 4,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct ThroughputArgs {
    /// Apps: at Douyin's 10 QPS each, 2,000 apps allow about 18,000 lookups/s.
    #[arg(long, default_value_t = 2000)]
    apps: usize,
    /// Seconds per concurrency level.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Lookups in flight, one run per level.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

impl Default for ThroughputArgs {
    fn default() -> Self {
        Self {
            apps: 2000,
            seconds: 8,
            concurrency: vec![64, 256],
            connections: 8,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct TokensArgs {
    #[arg(long, default_value_t = 100)]
    apps: usize,
    #[arg(long, default_value_t = 1000)]
    merchants: usize,
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Requests in flight, one run per level.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

impl Default for TokensArgs {
    fn default() -> Self {
        Self {
            apps: 100,
            merchants: 1000,
            seconds: 8,
            concurrency: vec![8, 32],
            connections: 4,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct ScaleArgs {
    #[arg(long, default_value_t = 10_000)]
    apps: usize,
    #[arg(long, default_value_t = 100_000)]
    merchants: usize,
    /// Simulated hours of the token fetch schedule (manual clock, 15 s sweeps).
    #[arg(long, default_value_t = 4)]
    simulated_hours: u64,
}

impl Default for ScaleArgs {
    fn default() -> Self {
        Self {
            apps: 10_000,
            merchants: 100_000,
            simulated_hours: 4,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct SoakArgs {
    /// Real-time minutes against the spawned daemon.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Overrides --minutes, for quick tries.
    #[arg(long)]
    seconds: Option<u64>,
    #[arg(long, default_value_t = 20)]
    apps: usize,
    /// Lookups per app per second (Douyin allows 10).
    #[arg(long, default_value_t = 5)]
    lookups_per_app: usize,
    /// Run the manual-clock form of the soak test (tests/api/accelerated.rs) instead (ten simulated minutes).
    #[arg(long)]
    simulated: bool,
}

impl Default for SoakArgs {
    fn default() -> Self {
        Self {
            minutes: 10,
            seconds: None,
            apps: 20,
            lookups_per_app: 5,
            simulated: false,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct ClusterArgs {
    /// Apps, one merchant each: at Douyin's 10 QPS per app, 2,000 apps allow
    /// about 18,000 lookups/s, to one daemon and to the cluster alike.
    #[arg(long, default_value_t = 2000)]
    apps: usize,
    /// Daemons on the PostgreSQL database (at least 2).
    #[arg(long, default_value_t = 2)]
    daemons: usize,
    /// Seconds per throughput level.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Lookups in flight, one run per level, through each setup.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    concurrency: Vec<usize>,
    /// GetAccessToken requests in flight, one run per level, through each setup.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    token_concurrency: Vec<usize>,
    /// gRPC connections in all, split evenly over the daemons (rounded up).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Forced refreshes whose propagation to the other daemons is measured
    /// (the cluster's token budget is 500 per 5 minutes).
    #[arg(long, default_value_t = 50)]
    refreshes: usize,
    /// Failover rounds (each waits out an 8 s fetch lease).
    #[arg(long, default_value_t = 5)]
    failovers: usize,
}

impl Default for ClusterArgs {
    fn default() -> Self {
        Self {
            apps: 2000,
            daemons: 2,
            seconds: 8,
            concurrency: vec![64],
            token_concurrency: vec![32],
            connections: 8,
            refreshes: 50,
            failovers: 5,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // reqwest is built without a default TLS provider (see douyin::DouyinClient).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let daemon_binary = match cli.daemon_binary.clone() {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("the bench binary has no directory")?
            .join("douyin-tokend"),
    };
    warn_if_daemon_binary_is_stale(&daemon_binary);
    runtime.block_on(async move {
        let bench = Bench { daemon_binary };
        match cli.scenario {
            Scenario::Overhead(arguments) => bench.overhead(&arguments).await,
            Scenario::Throughput(arguments) => bench.throughput(&arguments).await,
            Scenario::Tokens(arguments) => bench.tokens(&arguments).await,
            Scenario::Scale(arguments) => bench.scale(&arguments).await,
            Scenario::Soak(arguments) => bench.soak(&arguments).await,
            Scenario::Webhook(arguments) => bench.webhook(&arguments).await,
            Scenario::Cluster(arguments) => bench.cluster(&arguments).await,
            Scenario::All => {
                bench.overhead(&OverheadArgs::default()).await?;
                bench.throughput(&ThroughputArgs::default()).await?;
                bench.tokens(&TokensArgs::default()).await?;
                bench.scale(&ScaleArgs::default()).await?;
                bench.webhook(&WebhookArgs::default()).await?;
                bench.cluster(&ClusterArgs::default()).await?;
                bench.soak(&SoakArgs::default()).await
            }
        }
    })
}

struct Bench {
    daemon_binary: PathBuf,
}

/// `cargo run --bin douyin-bench` rebuilds only the bench: a daemon binary
/// older than the bench may predate a change to the daemon's code, and the
/// numbers would then describe the old code.
fn warn_if_daemon_binary_is_stale(daemon_binary: &Path) {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|metadata| metadata.modified());
    let (Ok(bench), Ok(daemon)) = (
        std::env::current_exe().and_then(|path| modified(&path)),
        modified(daemon_binary),
    ) else {
        return;
    };
    if daemon < bench {
        eprintln!(
            "warning: {} is older than this bench binary; if the daemon's code changed, rebuild both with `cargo build --release --bins`",
            daemon_binary.display()
        );
    }
}

fn heading(title: &str) {
    println!("\n## {title}\n");
    println!("machine: {}", Machine::describe());
}

fn footer(started: Instant) {
    println!(
        "\nfinished in {:.1} s; load average now {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_are_stripped_from_log_lines() {
        let line = "\u{1b}[2m2026-11-25T20:26:28.211706Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[2mdouyin_tokend::token\u{1b}[0m\u{1b}[2m:\u{1b}[0m client_token fetch failed; backing off \u{1b}[3mapp\u{1b}[0m\u{1b}[2m=\u{1b}[0mapp:c6b95411";
        assert_eq!(
            strip_colour_codes(line),
            "2026-11-25T20:26:28.211706Z  WARN douyin_tokend::token: client_token fetch failed; backing off app=app:c6b95411"
        );
    }
}
