//! Scenario `webhook`: Douyin's refund-request notifications posted to the
//! spawned daemon's webhook over loopback. First, delivery latency at a fixed
//! rate: from the moment a notification is posted until a gRPC watcher
//! (WatchAfterSaleEvents) receives it. Then the most notifications accepted
//! per second, closed loop; every 200 means the event was committed to
//! SQLite (synchronous=FULL) before the answer.

use std::collections::HashMap;

use douyin_tokend::proto::douyin::goodlife::v1::WatchAfterSaleEventsRequest;
use douyin_tokend::sandbox::notifications::{NotificationSender, RefundRequestContent, Signing};
use parking_lot::Mutex;

use super::*;
use crate::throughput::closed_loop;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WebhookArgs {
    /// Notifications per second in the latency run.
    #[arg(long, default_value_t = 200)]
    pub(crate) rate: u32,
    #[arg(long, default_value_t = 10)]
    pub(crate) latency_seconds: u64,
    /// Seconds per concurrency level in the throughput run.
    #[arg(long, default_value_t = 8)]
    pub(crate) seconds: u64,
    /// Posts in flight, one throughput run per level.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub(crate) concurrency: Vec<usize>,
}

impl Default for WebhookArgs {
    fn default() -> Self {
        Self {
            rate: 200,
            latency_seconds: 10,
            seconds: 8,
            concurrency: vec![16, 64],
        }
    }
}

/// Where and as whom the bench posts.
#[derive(Clone)]
struct Poster {
    sender: NotificationSender,
    client_key: String,
    client_secret: String,
    account_id: String,
}

impl Poster {
    /// Posts one correctly signed notification; `None` when answered 200.
    async fn post(&self, msg_id: &str) -> Option<String> {
        let content = RefundRequestContent::example(&self.account_id, msg_id);
        match self
            .sender
            .send_refund_request(
                &self.client_key,
                &self.client_secret,
                msg_id,
                &content,
                Signing::Correct,
            )
            .await
        {
            Ok(200) => None,
            Ok(status) => Some(format!("HTTP {status}")),
            Err(error) => Some(format!("{error}")),
        }
    }
}

impl Bench {
    pub(crate) async fn webhook(&self, arguments: &WebhookArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading(
            "Webhook: refund-request notifications, stored before the 200, streamed to a watcher",
        );
        let fleet = Fleet::new(1, 1);
        let setup = set_up(fleet, SandboxConfig::default(), Arc::new(SystemClock), true).await?;
        let settings = DaemonSettings {
            extra_tables: "[webhook]\nlisten = \"127.0.0.1:0\"\n".to_owned(),
            ..DaemonSettings::default()
        };
        let (daemon, _) = setup.spawn(&self.daemon_binary, &settings).await?;
        let webhook = daemon
            .process
            .webhook_address
            .context("the daemon's READY status names no webhook address")?;
        let poster = Poster {
            sender: NotificationSender::new(format!("http://{webhook}/douyin/webhook")),
            client_key: fleet.client_key(0),
            client_secret: fleet.client_secret(0),
            account_id: fleet.account_id(0),
        };
        println!(
            "one app, plain HTTP/1.1 on loopback, signature checked on every post; SQLite WAL, synchronous=FULL for events\n"
        );

        let mut table = Table::new(&[
            "run",
            "notifications",
            "per second",
            "failed",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "daemon CPU %",
        ]);
        let before = daemon.sample();
        let latency_started = Instant::now();
        let (acks, deliveries, failed) = latency_run(&daemon, &poster, arguments).await?;
        let elapsed = latency_started.elapsed();
        let cpu = daemon.sample().cpu.saturating_sub(before.cpu);
        let cpu_percent = |cpu: Duration, elapsed: Duration| {
            format!("{:.0}", 100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64())
        };
        let delivery = deliveries.summary();
        for (run, summary) in [
            (format!("{}/s: post → 200", arguments.rate), acks.summary()),
            (format!("{}/s: post → watcher", arguments.rate), delivery),
        ] {
            let mut cells = vec![
                run,
                summary.count.to_string(),
                format!("{:.0}", summary.count as f64 / elapsed.as_secs_f64()),
                failed.to_string(),
            ];
            cells.extend(latency_cells(&summary));
            cells.push(cpu_percent(cpu, elapsed));
            table.row(cells);
        }

        let mut best = 0.0_f64;
        let mut failures = Vec::new();
        for concurrency in &arguments.concurrency {
            let before = daemon.sample();
            let level_poster = poster.clone();
            let level = *concurrency;
            let (outcomes, elapsed) = closed_loop(level, arguments.seconds, move |index| {
                let poster = level_poster.clone();
                async move { poster.post(&format!("load-{level}-{index}")).await }
            })
            .await?;
            let cpu = daemon.sample().cpu.saturating_sub(before.cpu);
            let summary = outcomes.latencies.summary();
            let rate = summary.count as f64 / elapsed.as_secs_f64();
            if outcomes.failed() == 0 {
                best = best.max(rate);
            }
            let mut cells = vec![
                format!("closed loop, {level} in flight: post → 200"),
                summary.count.to_string(),
                format!("{rate:.0}"),
                outcomes.failed().to_string(),
            ];
            cells.extend(latency_cells(&summary));
            cells.push(cpu_percent(cpu, elapsed));
            table.row(cells);
            failures.push(outcomes.describe_failures());
        }
        print!("{table}");
        println!(
            "\nfailures per level: {}; daemon's warnings and errors: {:?}; daemon RSS {} KiB",
            failures.join(" | "),
            daemon.log_problems(),
            daemon.sample().resident_kib
        );
        println!(
            "target ≥ 2,000 notifications/s accepted, each stored before its 200: {} ({best:.0}/s)",
            verdict(best >= 2_000.0)
        );
        println!(
            "target p99 ≤ 50 ms from webhook to watcher at {}/s: {} ({} ms)",
            arguments.rate,
            verdict(delivery.p99_us <= 50_000 && failed == 0),
            format_ms(delivery.p99_us)
        );
        footer(started);
        Ok(())
    }
}

/// Posts `rate` notifications per second for `latency_seconds` (each on a
/// task of its own, so a slow answer does not delay the next post) while a
/// watcher follows the stream; returns the post → 200 latencies, the post →
/// watcher latencies and the failed posts.
async fn latency_run(
    daemon: &SpawnedDaemon,
    poster: &Poster,
    arguments: &WebhookArgs,
) -> anyhow::Result<(Latencies, Latencies, u64)> {
    let channel = daemon.channels(1).await?.remove(0);
    let mut client =
        AfterSaleServiceClient::with_interceptor(channel, douyin_tokend::bench::bench_auth());
    let mut stream = client
        .watch_after_sale_events(WatchAfterSaleEventsRequest::default())
        .await?
        .into_inner();
    let posted_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let expected = u64::from(arguments.rate) * arguments.latency_seconds;
    let watcher_posted_at = Arc::clone(&posted_at);
    let watcher = tokio::spawn(async move {
        let mut deliveries = Latencies::default();
        let mut received = 0;
        while received < expected {
            let next = tokio::time::timeout(CALL_BOUND, stream.message()).await;
            let Ok(Ok(Some(event))) = next else { break };
            let arrived = Instant::now();
            if let Some(posted) = watcher_posted_at.lock().remove(&event.msg_id) {
                deliveries.record(arrived - posted);
            }
            received += 1;
        }
        deliveries
    });
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / arguments.rate.max(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut posts = Vec::with_capacity(expected as usize);
    for index in 0..expected {
        ticks.tick().await;
        let poster = poster.clone();
        let posted_at = Arc::clone(&posted_at);
        posts.push(tokio::spawn(async move {
            let msg_id = format!("latency-{index}");
            let begun = Instant::now();
            posted_at.lock().insert(msg_id.clone(), begun);
            let failure = poster.post(&msg_id).await;
            (begun.elapsed(), failure)
        }));
    }
    let mut acks = Latencies::default();
    let mut failed = 0;
    for post in posts {
        match post.await? {
            (latency, None) => acks.record(latency),
            (_, Some(_)) => failed += 1,
        }
    }
    let deliveries = watcher.await?;
    Ok((acks, deliveries, failed))
}
