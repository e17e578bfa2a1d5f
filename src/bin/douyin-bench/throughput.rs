//! Scenarios 2 and 3, closed-loop throughput: lookups and token hand-outs at a
//! fixed number in flight, with the daemon's CPU per call.

use super::*;

/// One level's row of both throughput tables: in flight, calls/s, failed,
/// latency percentiles, daemon CPU per call and daemon CPU %.
fn level_row(
    concurrency: usize,
    rate: f64,
    outcomes: &Outcomes,
    summary: &LatencySummary,
    cpu: Duration,
    elapsed: Duration,
) -> Vec<String> {
    let mut cells = vec![
        concurrency.to_string(),
        format!("{rate:.0}"),
        outcomes.failed().to_string(),
    ];
    cells.extend(latency_cells(summary));
    cells.push(format!(
        "{:.1}",
        cpu.as_secs_f64() * 1e6 / summary.count.max(1) as f64
    ));
    cells.push(format!(
        "{:.0}",
        cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0
    ));
    cells
}

/// Runs `concurrency` closed-loop callers for `seconds`, each calling `call`
/// with a global sequence number until time is up; returns the outcomes and
/// the wall time.
pub(crate) async fn closed_loop<F, Fut>(
    concurrency: usize,
    seconds: u64,
    call: F,
) -> anyhow::Result<(Outcomes, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send,
{
    let call = Arc::new(call);
    let sequence = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let call = Arc::clone(&call);
        let sequence = Arc::clone(&sequence);
        let stop = Arc::clone(&stop);
        workers.push(tokio::spawn(async move {
            let mut outcomes = Outcomes::default();
            while !stop.load(Ordering::Relaxed) {
                let index = sequence.fetch_add(1, Ordering::Relaxed);
                let begun = Instant::now();
                let failure = call(index).await;
                outcomes.record(begun.elapsed(), failure);
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Outcomes::default();
    for worker in workers {
        outcomes.merge(worker.await?);
    }
    Ok((outcomes, started.elapsed()))
}

impl Bench {
    pub(crate) async fn throughput(&self, arguments: &ThroughputArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading("Throughput: closed-loop lookups through the daemon, many apps");
        // Douyin's own 10 QPS per app stays on at the sandbox; enough apps
        // that the limit is not what stops the daemon.
        let fleet = Fleet::new(arguments.apps, arguments.apps);
        let setup =
            Arc::new(set_up(fleet, SandboxConfig::default(), Arc::new(SystemClock), true).await?);
        let (daemon, _) = setup
            .spawn(&self.daemon_binary, &DaemonSettings::default())
            .await?;
        let channels = Arc::new(daemon.channels(arguments.connections).await?);
        println!(
            "{} apps (pacing allows {:.0} lookups/s), sandbox at 10 QPS per app and no delay, {} gRPC connections, {} s per level\n",
            arguments.apps,
            arguments.apps as f64 * 10.0 / 1.1,
            arguments.connections,
            arguments.seconds
        );
        let mut table = Table::new(&[
            "in flight",
            "lookups/s",
            "failed",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "daemon CPU µs/lookup",
            "daemon CPU %",
        ]);
        let mut best = 0.0_f64;
        let mut failures = Vec::new();
        for concurrency in &arguments.concurrency {
            let before = daemon.sample();
            let call_setup = Arc::clone(&setup);
            let call_channels = Arc::clone(&channels);
            let (outcomes, elapsed) = closed_loop(*concurrency, arguments.seconds, move |index| {
                let request = call_setup.lookup_request(index);
                let mut client = AfterSaleServiceClient::with_interceptor(
                    call_channels[index % call_channels.len()].clone(),
                    douyin_tokend::bench::bench_auth(),
                );
                async move {
                    client
                        .get_after_sale_order_detail(request)
                        .await
                        .err()
                        .map(|status| status_kind(&status))
                }
            })
            .await?;
            let cpu = daemon.sample().cpu.saturating_sub(before.cpu);
            let summary = outcomes.latencies.summary();
            let rate = summary.count as f64 / elapsed.as_secs_f64();
            if outcomes.failed() == 0 {
                best = best.max(rate);
            }
            table.row(level_row(
                *concurrency,
                rate,
                &outcomes,
                &summary,
                cpu,
                elapsed,
            ));
            failures.push(outcomes.describe_failures());
        }
        print!("{table}");
        let stats = setup.sandbox.state().stats();
        println!(
            "\nfailures per level: {}\nsandbox: {} lookups, 2119003 answered {} times; daemon's warnings and errors: {:?}; daemon RSS {} KiB",
            failures.join(" | "),
            stats.lookups,
            stats.lookups_answered_with(2_119_003),
            daemon.log_problems(),
            daemon.sample().resident_kib
        );
        println!(
            "target ≥ 10,000 lookups/s sustained without failures: {} ({best:.0}/s)",
            verdict(best >= 10_000.0)
        );
        footer(started);
        Ok(())
    }

    pub(crate) async fn tokens(&self, arguments: &TokensArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading("Token hand-out: closed-loop GetAccessToken by account_id");
        let fleet = Fleet::new(arguments.apps, arguments.merchants);
        let setup =
            Arc::new(set_up(fleet, SandboxConfig::default(), Arc::new(SystemClock), true).await?);
        let (daemon, _) = setup
            .spawn(&self.daemon_binary, &DaemonSettings::default())
            .await?;
        let channels = Arc::new(daemon.channels(arguments.connections).await?);
        println!(
            "{} apps, {} merchants, {} gRPC connections, {} s per level\n",
            arguments.apps, arguments.merchants, arguments.connections, arguments.seconds
        );
        let mut table = Table::new(&[
            "in flight",
            "requests/s",
            "failed",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "daemon CPU µs/request",
            "daemon CPU %",
        ]);
        let mut met = false;
        for concurrency in &arguments.concurrency {
            let before = daemon.sample();
            let call_setup = Arc::clone(&setup);
            let call_channels = Arc::clone(&channels);
            let (outcomes, elapsed) = closed_loop(*concurrency, arguments.seconds, move |index| {
                let account_id = call_setup
                    .fleet
                    .account_id(index % call_setup.fleet.merchants);
                let mut client = TokenServiceClient::with_interceptor(
                    call_channels[index % call_channels.len()].clone(),
                    douyin_tokend::bench::bench_auth(),
                );
                async move {
                    client
                        .get_access_token(GetAccessTokenRequest {
                            selector: Some(Selector::AccountId(account_id)),
                        })
                        .await
                        .err()
                        .map(|status| status_kind(&status))
                }
            })
            .await?;
            let cpu = daemon.sample().cpu.saturating_sub(before.cpu);
            let summary = outcomes.latencies.summary();
            let rate = summary.count as f64 / elapsed.as_secs_f64();
            met |= rate >= 30_000.0 && summary.p99_us < 1000 && outcomes.failed() == 0;
            table.row(level_row(
                *concurrency,
                rate,
                &outcomes,
                &summary,
                cpu,
                elapsed,
            ));
        }
        print!("{table}");
        println!(
            "\ntokens fetched from the sandbox during the run: {} (stored tokens were loaded at start)",
            setup.sandbox.state().stats().tokens_issued_total() - setup.fleet.apps as u64
        );
        println!(
            "target ≥ 30,000 requests/s with p99 < 1 ms at one level: {}",
            verdict(met)
        );
        footer(started);
        Ok(())
    }
}
