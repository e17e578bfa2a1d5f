//! Scenario 5, soak: hours of Douyin's life on a manual clock, with faults, and
//! the accounting of token errors, 2119003 and fetches against the minimum.

use super::*;

impl Bench {
    pub(crate) async fn soak(&self, arguments: &SoakArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        if arguments.simulated {
            heading(
                "Soak, simulated: ten minutes on a manual clock (the form tests/api/accelerated.rs runs)",
            );
            let plan = SoakPlan::default();
            let report = soak::run_simulated(&plan).await?;
            print_soak_report(
                &plan,
                &report,
                "this process (the in-process daemon, the sandbox and the load together)",
            );
            footer(started);
            return Ok(());
        }
        let duration = Duration::from_secs(arguments.seconds.unwrap_or(arguments.minutes * 60));
        let plan = SoakPlan {
            apps: arguments.apps,
            lookups_per_app_per_second: arguments.lookups_per_app,
            duration,
            ..SoakPlan::default()
        };
        heading(&format!(
            "Soak: {} s of real time, {} apps × {} lookups/s and {} GetAccessToken/s each, {} s tokens with {} s grace",
            duration.as_secs(),
            plan.apps,
            plan.lookups_per_app_per_second,
            plan.token_requests_per_app_per_second,
            plan.token_lifetime.as_secs(),
            plan.grace.as_secs()
        ));
        let clock: SharedClock = Arc::new(SystemClock);
        let fleet = Fleet::new(plan.apps, plan.apps);
        let setup = set_up(fleet, plan.sandbox_config(), clock, false).await?;
        let mut settings = DaemonSettings {
            // Every second, so the short refresh window is never missed.
            sweep: "* * * * * *".to_owned(),
            ..DaemonSettings::default()
        };
        let mut config = Config::default();
        plan.adjust_daemon_config(&mut config);
        settings.refresh = format!(
            "window_start = \"{}s\"\nwindow_end = \"{}s\"\nmin_interval = \"{}s\"\nbackoff_initial = \"{}s\"\nbackoff_max = \"{}s\"",
            config.refresh.window_start.as_secs(),
            config.refresh.window_end.as_secs(),
            config.refresh.min_interval.as_secs(),
            config.refresh.backoff_initial.as_secs(),
            config.refresh.backoff_max.as_secs()
        );
        let (daemon, _) = setup.spawn(&self.daemon_binary, &settings).await?;
        let channels = daemon.channels(4).await?;
        let soak_started = Instant::now();

        let lookups_per_second = plan.apps * plan.lookups_per_app_per_second;
        let tokens_per_second = plan.apps * plan.token_requests_per_app_per_second;
        let tick = Duration::from_millis(10);
        let ticks = usize::try_from(duration.as_millis() / tick.as_millis())?;
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut lookup_index = 0_usize;
        let mut token_index = 0_usize;
        let mut calls = Vec::new();
        let mut report = SoakReport::default();
        let mut invalidated_at = vec![Vec::new(); plan.apps];
        let mut out_of_band = 0;
        let mut next_invalidation = plan.invalidation_every;
        let mut next_token_fault = plan.invalidation_every / 2;
        let mut cpu_samples = Vec::new();
        for tick_number in 0..ticks {
            ticker.tick().await;
            let elapsed = soak_started.elapsed();
            // Spread each second's calls evenly over its 100 ticks.
            let lookups_due = (tick_number + 1) * lookups_per_second / 100;
            while lookup_index < lookups_due {
                let app = lookup_index % plan.apps;
                let request = GetAfterSaleOrderDetailRequest {
                    account_id: setup.fleet.account_id(setup.fleet.merchant_of_app(app)),
                    order_id: order_id(lookup_index % ORDERS),
                    certificate_id: None,
                    include_raw_json: false,
                };
                let mut client = AfterSaleServiceClient::with_interceptor(
                    channels[lookup_index % channels.len()].clone(),
                    douyin_tokend::bench::bench_auth(),
                );
                calls.push(tokio::spawn(async move {
                    (
                        true,
                        client.get_after_sale_order_detail(request).await.err(),
                    )
                }));
                lookup_index += 1;
            }
            let tokens_due = (tick_number + 1) * tokens_per_second / 100;
            while token_index < tokens_due {
                let app = token_index % plan.apps;
                let request = GetAccessTokenRequest {
                    selector: Some(Selector::AccountId(
                        setup.fleet.account_id(setup.fleet.merchant_of_app(app)),
                    )),
                };
                let mut client = TokenServiceClient::with_interceptor(
                    channels[token_index % channels.len()].clone(),
                    douyin_tokend::bench::bench_auth(),
                );
                calls.push(tokio::spawn(async move {
                    (false, client.get_access_token(request).await.err())
                }));
                token_index += 1;
            }
            if elapsed >= next_invalidation {
                let victim = plan.invalidated_app(report.invalidations as usize);
                for _ in 0..2 {
                    setup
                        .sandbox
                        .state()
                        .issue_token_out_of_band(&setup.fleet.client_key(victim));
                    out_of_band += 1;
                }
                invalidated_at[victim].push(elapsed.as_secs_f64());
                report.invalidations += 1;
                next_invalidation += plan.invalidation_every;
            }
            if plan.token_faults && elapsed >= next_token_fault {
                setup
                    .sandbox
                    .state()
                    .push_token_faults([Fault::HttpStatus(500)]);
                report.token_faults_injected += 1;
                next_token_fault += plan.invalidation_every;
            }
            if tick_number % 1000 == 0 {
                let sample = daemon.sample();
                report
                    .resident_kib
                    .push((elapsed.as_secs(), sample.resident_kib));
                cpu_samples.push((elapsed.as_secs(), sample.cpu));
            }
            // Collect finished calls as we go, so memory here stays flat too.
            if calls.len() > 4096 {
                collect_finished(&mut calls, &mut report, false).await;
            }
        }
        collect_finished(&mut calls, &mut report, true).await;
        let final_sample = daemon.sample();
        report
            .resident_kib
            .push((soak_started.elapsed().as_secs(), final_sample.resident_kib));
        report.take_sandbox_stats(&setup.sandbox.state().stats(), out_of_band);
        report.minimum_fetches = soak::minimum_fetches(
            plan.duration,
            plan.token_lifetime,
            plan.refresh_window_end,
            &invalidated_at,
        );
        report.duration_seconds = plan.duration.as_secs_f64();
        report.real_seconds = soak_started.elapsed().as_secs_f64();
        print_soak_report(&plan, &report, "the spawned daemon");
        println!(
            "daemon CPU {:.1} s over the run ({:.1} % of one core)\ndaemon's warnings and errors: {:#?}",
            final_sample.cpu.as_secs_f64(),
            final_sample.cpu.as_secs_f64() / report.real_seconds * 100.0,
            daemon.log_problems()
        );
        footer(started);
        Ok(())
    }
}

pub(crate) type SoakCall = tokio::task::JoinHandle<(bool, Option<tonic::Status>)>;

/// Takes the finished calls' outcomes into the report (all of them when `wait_for_all`).
pub(crate) async fn collect_finished(
    calls: &mut Vec<SoakCall>,
    report: &mut SoakReport,
    wait_for_all: bool,
) {
    let mut pending = Vec::with_capacity(calls.len());
    for call in calls.drain(..) {
        if !wait_for_all && !call.is_finished() {
            pending.push(call);
            continue;
        }
        let (is_lookup, failure) = match call.await {
            Ok(outcome) => outcome,
            Err(join_error) => (true, Some(tonic::Status::internal(join_error.to_string()))),
        };
        if is_lookup {
            report.lookups += 1;
            if failure.is_none() {
                report.lookups_ok += 1;
            }
        } else {
            report.token_requests += 1;
        }
        if let Some(status) = failure {
            report.record_status(&status);
        }
    }
    *calls = pending;
}

pub(crate) fn print_soak_report(plan: &SoakPlan, report: &SoakReport, measured: &str) {
    let mut table = Table::new(&["measure", "value", "target"]);
    let rows = [
        (
            "lookups (ok / sent)",
            format!("{} / {}", report.lookups_ok, report.lookups),
            String::new(),
        ),
        (
            "GetAccessToken requests",
            report.token_requests.to_string(),
            String::new(),
        ),
        (
            "token errors seen by callers",
            report.token_errors.to_string(),
            format!("0: {}", verdict(report.token_errors == 0)),
        ),
        (
            "other failures seen by callers",
            format!("{:?}", report.other_errors),
            "transient faults that failed all 3 tries".to_owned(),
        ),
        (
            "2119003 answered by the sandbox",
            report.too_many_requests.to_string(),
            format!("0: {}", verdict(report.too_many_requests == 0)),
        ),
        (
            "token fetches / minimum needed",
            format!(
                "{} / {} ({:+.1} %)",
                report.token_fetches,
                report.minimum_fetches,
                report.excess_fetch_fraction() * 100.0
            ),
            format!(
                "within 5 %: {}",
                verdict(report.excess_fetch_fraction() <= 0.05)
            ),
        ),
        (
            "token endpoint calls (failed ones included)",
            report.token_calls.to_string(),
            String::new(),
        ),
        (
            "faults injected: busy lookups / token endpoint 500s / invalidations",
            format!(
                "{} / {} / {}",
                report.lookup_faults_injected, report.token_faults_injected, report.invalidations
            ),
            format!("{:.0} % of lookups", plan.lookup_fault_fraction * 100.0),
        ),
        (
            "lookups refused for their token (how the daemon learns of an invalidation)",
            report.token_rejections.to_string(),
            String::new(),
        ),
        (
            "resident memory growth after warm-up",
            format!("{} KiB", report.resident_growth_kib()),
            "flat".to_owned(),
        ),
    ];
    for (measure, value, target) in rows {
        table.row(vec![measure.to_owned(), value, target]);
    }
    print!("\n{table}");
    let samples: Vec<String> = report
        .resident_kib
        .iter()
        .map(|(second, kib)| format!("{second}s:{}", mib(*kib)))
        .collect();
    println!(
        "\nresident memory of {measured} (MiB): {}",
        samples.join(" ")
    );
    if !report.token_error_samples.is_empty() {
        println!("token errors, first few: {:#?}", report.token_error_samples);
    }
    println!(
        "clock seconds simulated / real: {:.1} / {:.1}",
        report.duration_seconds, report.real_seconds
    );
}
