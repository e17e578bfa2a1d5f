//! Scenario 1, overhead: the same lookups straight to the sandbox and through the
//! daemon, interleaved, at a fixed rate; what the daemon adds at each percentile.

use super::*;

impl Bench {
    pub(crate) async fn overhead(&self, arguments: &OverheadArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading(&format!(
            "Overhead: {} lookups/s on each path, straight to the sandbox and through the daemon, interleaved",
            arguments.rate
        ));
        // No per-app limit at the sandbox: the direct path is not paced, and
        // both paths share the apps. The daemon still paces each app at 10/s;
        // the lookups go round-robin over the apps, 5/s each at 1,000/s.
        let sandbox_config = SandboxConfig {
            lookup_qps: 0,
            ..SandboxConfig::default()
        };
        let fleet = Fleet::new(arguments.apps, arguments.apps);
        let setup = set_up(fleet, sandbox_config, Arc::new(SystemClock), true).await?;
        let (daemon, _) = setup
            .spawn(&self.daemon_binary, &DaemonSettings::default())
            .await?;
        let channels = daemon.channels(arguments.connections).await?;
        // The direct path holds the daemon's own tokens, as a service that
        // asks TokenService and then calls Douyin itself would.
        let mut tokens = Vec::with_capacity(setup.fleet.apps);
        for app in 0..setup.fleet.apps {
            let response = TokenServiceClient::with_interceptor(
                channels[0].clone(),
                douyin_tokend::bench::bench_auth(),
            )
            .get_access_token(GetAccessTokenRequest {
                selector: Some(Selector::ClientKey(setup.fleet.client_key(app))),
            })
            .await?
            .into_inner();
            tokens.push(response.access_token);
        }
        let tokens = Arc::new(tokens);
        let http = reqwest::Client::builder()
            .timeout(CALL_BOUND)
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        let direct_url = format!("{}{AFTER_SALE_PATH}", setup.sandbox.base_url());

        let interval_between = Duration::from_secs_f64(1.0 / f64::from(arguments.rate.max(1)));
        let total = arguments.rate as usize
            * usize::try_from(arguments.seconds + arguments.warmup_seconds)?;
        let warmup = arguments.rate as usize * usize::try_from(arguments.warmup_seconds)?;
        let mut ticker = tokio::time::interval(interval_between);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut direct_calls = Vec::with_capacity(total);
        let mut daemon_calls = Vec::with_capacity(total);
        let mut cpu_at_measure_start = None;
        let mut measure_started = Instant::now();
        for index in 0..total {
            ticker.tick().await;
            if index == warmup {
                cpu_at_measure_start = Some(daemon.sample());
                measure_started = Instant::now();
            }
            let request = setup.lookup_request(index);
            let app = setup.fleet.app_of_merchant(index % setup.fleet.merchants);
            let token = tokens[app].clone();
            let client = http.clone();
            let url = direct_url.clone();
            let direct_request = request.clone();
            let direct = async move {
                let begun = Instant::now();
                let failure = call_sandbox_directly(&client, &url, &token, &direct_request)
                    .await
                    .err();
                (begun.elapsed(), failure)
            };
            let mut grpc = AfterSaleServiceClient::with_interceptor(
                channels[index % channels.len()].clone(),
                douyin_tokend::bench::bench_auth(),
            );
            let through_daemon = async move {
                let begun = Instant::now();
                let failure = grpc
                    .get_after_sale_order_detail(request)
                    .await
                    .err()
                    .map(|status| status_kind(&status));
                (begun.elapsed(), failure)
            };
            // Alternate which path goes first, so neither always queues behind the other.
            if index % 2 == 0 {
                direct_calls.push(tokio::spawn(direct));
                daemon_calls.push(tokio::spawn(through_daemon));
            } else {
                daemon_calls.push(tokio::spawn(through_daemon));
                direct_calls.push(tokio::spawn(direct));
            }
        }
        let mut direct = Outcomes::default();
        let mut through_daemon = Outcomes::default();
        for (index, call) in direct_calls.into_iter().enumerate() {
            let (latency, failure) = call.await?;
            if index >= warmup {
                direct.record(latency, failure);
            }
        }
        for (index, call) in daemon_calls.into_iter().enumerate() {
            let (latency, failure) = call.await?;
            if index >= warmup {
                through_daemon.record(latency, failure);
            }
        }
        let measured_seconds = measure_started.elapsed().as_secs_f64();
        let cpu = daemon
            .sample()
            .cpu
            .saturating_sub(cpu_at_measure_start.unwrap_or_default().cpu);
        let direct_summary = direct.latencies.summary();
        let daemon_summary = through_daemon.latencies.summary();

        let mut table = Table::new(&[
            "path", "ok", "failed", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
        ]);
        for (name, outcomes, summary) in [
            ("sandbox over HTTP, token in hand", &direct, &direct_summary),
            ("daemon over gRPC", &through_daemon, &daemon_summary),
        ] {
            let mut cells = vec![
                name.to_owned(),
                summary.count.to_string(),
                outcomes.failed().to_string(),
            ];
            cells.extend(latency_cells(summary));
            table.row(cells);
        }
        let added = |through: u64, straight: u64| format_ms(through.saturating_sub(straight));
        table.row(vec![
            "daemon adds".to_owned(),
            String::new(),
            String::new(),
            added(daemon_summary.p50_us, direct_summary.p50_us),
            added(daemon_summary.p90_us, direct_summary.p90_us),
            added(daemon_summary.p99_us, direct_summary.p99_us),
            added(daemon_summary.p999_us, direct_summary.p999_us),
            String::new(),
        ]);
        let ratio = |through: u64, straight: u64| {
            format!("{:.2}×", through as f64 / straight.max(1) as f64)
        };
        table.row(vec![
            "ratio".to_owned(),
            String::new(),
            String::new(),
            ratio(daemon_summary.p50_us, direct_summary.p50_us),
            ratio(daemon_summary.p90_us, direct_summary.p90_us),
            ratio(daemon_summary.p99_us, direct_summary.p99_us),
            ratio(daemon_summary.p999_us, direct_summary.p999_us),
            String::new(),
        ]);
        println!(
            "{} apps, {} s measured after {} s warm-up, {} gRPC connections, sandbox without delay or QPS limit\n",
            setup.fleet.apps, arguments.seconds, arguments.warmup_seconds, arguments.connections
        );
        print!("{table}");
        println!(
            "\ndaemon CPU: {:.1} µs per lookup ({:.0} % of one core); failures: direct {}; daemon {}",
            cpu.as_secs_f64() * 1e6 / daemon_summary.count.max(1) as f64,
            cpu.as_secs_f64() / measured_seconds * 100.0,
            direct.describe_failures(),
            through_daemon.describe_failures()
        );
        let p50_added = daemon_summary.p50_us.saturating_sub(direct_summary.p50_us);
        let p99_added = daemon_summary.p99_us.saturating_sub(direct_summary.p99_us);
        println!(
            "targets: adds ≤ 0.3 ms at p50: {}; ≤ 1 ms at p99: {}",
            verdict(p50_added <= 300),
            verdict(p99_added <= 1000)
        );
        footer(started);
        Ok(())
    }
}

/// Drops ANSI colour sequences (`ESC [ … m`), which the daemon's log has when
/// tracing decides to colour it.
pub(crate) fn strip_colour_codes(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut characters = line.chars();
    while let Some(character) = characters.next() {
        if character == '\u{1b}' {
            for inner in characters.by_ref() {
                if inner == 'm' {
                    break;
                }
            }
        } else {
            plain.push(character);
        }
    }
    plain
}

pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// What a service holding a token would do: one GET, the body read, the
/// JSON decoded into the same messages the daemon answers with.
pub(crate) async fn call_sandbox_directly(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    request: &GetAfterSaleOrderDetailRequest,
) -> Result<(), String> {
    let response = client
        .get(url)
        .header("access-token", token)
        .query(&[
            ("account_id", request.account_id.as_str()),
            ("order_id", request.order_id.as_str()),
        ])
        .send()
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|error| format!("HTTP body: {error}"))?;
    decode_after_sale_answer(status, &body, "application/json", String::new())
        .map(|_| ())
        .map_err(|failure| failure.to_string())
}
