//! Scenario 4, scale: many apps and merchants, start-up time, memory, and apps
//! whose token lapsed.

use super::*;

impl Bench {
    pub(crate) async fn scale(&self, arguments: &ScaleArgs) -> anyhow::Result<()> {
        let started = Instant::now();
        heading(&format!(
            "Scale: {} apps and {} merchants",
            arguments.apps, arguments.merchants
        ));
        let fleet = Fleet::new(arguments.apps, arguments.merchants);

        // Start-up and memory, from the spawned binary: first without stored
        // tokens (a new installation), then with a valid token stored for
        // every app (every restart after that).
        let mut table = Table::new(&[
            "start",
            "ready after ms",
            "RSS at ready MiB",
            "RSS after 10 s MiB",
            "peak RSS MiB",
            "token fetches in first 10 s",
        ]);
        let mut ready_times = Vec::new();
        let mut peak_rss_kib = 0;
        let filled = fill_database(fleet).await?;
        println!(
            "database filled through the store in {:.1} s ({} apps, {} merchants, source admin)",
            filled.seconds, fleet.apps, fleet.merchants
        );
        for store_tokens in [false, true] {
            let setup = set_up_from(
                &filled,
                fleet,
                SandboxConfig::default(),
                Arc::new(SystemClock),
                store_tokens,
            )
            .await?;
            let issued_before = setup.sandbox.state().stats().tokens_issued_total();
            let (daemon, ready_after) = setup
                .spawn(&self.daemon_binary, &DaemonSettings::default())
                .await?;
            let at_ready = daemon.sample();
            tokio::time::sleep(Duration::from_secs(10)).await;
            let later = daemon.sample();
            let fetched = setup.sandbox.state().stats().tokens_issued_total() - issued_before;
            peak_rss_kib = peak_rss_kib.max(later.peak_resident_kib);
            ready_times.push(ready_after);
            table.row(vec![
                if store_tokens {
                    "restart, every token stored".to_owned()
                } else {
                    "first start, no tokens".to_owned()
                },
                format!("{:.0}", ready_after.as_secs_f64() * 1000.0),
                mib(at_ready.resident_kib),
                mib(later.resident_kib),
                mib(later.peak_resident_kib),
                fetched.to_string(),
            ]);
        }
        print!("\n{table}");
        println!(
            "targets: ready < 2 s: {}; resident memory < 64 MB: {}",
            verdict(
                ready_times
                    .iter()
                    .all(|ready| *ready < Duration::from_secs(2))
            ),
            verdict(peak_rss_kib * 1024 < 64 * 1000 * 1000)
        );

        println!(
            "\nToken fetch schedule over {} simulated hours (in-process daemon, manual clock shared with the sandbox, a sweep every simulated 15 s as the default cron does; 2-hour tokens; budget 500 per 5 min with 50 kept for urgent fetches):\n",
            arguments.simulated_hours
        );
        self.simulated_fetch_schedule(&filled, fleet, arguments.simulated_hours)
            .await?;
        footer(started);
        Ok(())
    }

    pub(crate) async fn simulated_fetch_schedule(
        &self,
        filled: &FilledDatabase,
        fleet: Fleet,
        hours: u64,
    ) -> anyhow::Result<()> {
        let clock = ManualClock::starting_at(1_767_225_600_000);
        let shared_clock: SharedClock = clock.clone();
        let setup = set_up_from(
            filled,
            fleet,
            SandboxConfig::default(),
            shared_clock.clone(),
            false,
        )
        .await?;
        let mut config = Config {
            database: douyin_tokend::config::DatabaseSetting::Sqlite(setup.database.clone()),
            ..Config::default()
        };
        config.clients.push(douyin_tokend::bench::bench_client());
        config.douyin.base_url = setup.sandbox.base_url();
        config.refresh.sweep = None;
        let app = App::start(config, shared_clock).await?;
        let step = Duration::from_secs(15);
        let steps = usize::try_from(hours * 3600 / 15)?;
        let mut fetched_per_step = Vec::with_capacity(steps);
        let mut first_time_all_held = None;
        let mut lapsed_after_coverage = 0;
        let mut issued_before = 0;
        let real_started = Instant::now();
        for index in 0..steps {
            app.tokens.sweep().await;
            let issued = setup.sandbox.state().stats().tokens_issued_total();
            fetched_per_step.push(issued - issued_before);
            issued_before = issued;
            let without_token = app
                .tokens
                .status()
                .iter()
                .filter(|status| status.state != "valid")
                .count();
            if first_time_all_held.is_none() && without_token == 0 {
                first_time_all_held = Some(index as f64 * 15.0 / 60.0);
            } else if first_time_all_held.is_some() {
                // Once every app held a token, none may lapse for want of budget.
                lapsed_after_coverage = lapsed_after_coverage.max(without_token);
            }
            clock.advance(step);
        }
        let stats = setup.sandbox.state().stats();
        app.close().await;
        // Every sliding 5-minute window (20 steps) of the schedule.
        let window_sums: Vec<u64> = fetched_per_step
            .windows(20)
            .map(|window| window.iter().sum())
            .collect();
        let mut table = Table::new(&["simulated 5-minute window", "fetches", "largest 15 s step"]);
        for (window, steps) in fetched_per_step.chunks(20).enumerate() {
            table.row(vec![
                format!("{:>3}–{:>3} min", window * 5, window * 5 + 5),
                steps.iter().sum::<u64>().to_string(),
                steps.iter().max().copied().unwrap_or(0).to_string(),
            ]);
        }
        print!("{table}");
        let busiest_window = window_sums.iter().max().copied().unwrap_or(0);
        let busiest_step = fetched_per_step.iter().max().copied().unwrap_or(0);
        let mut summary = String::new();
        writeln!(
            summary,
            "\ntotal fetches {}; busiest sliding 5-minute window {}; busiest 15 s step {} (first step: {}); 10020 answers {}; every app held a valid token after {}, and afterwards at most {} apps at once held none; {:.1} s of real time",
            stats.tokens_issued_total(),
            busiest_window,
            busiest_step,
            fetched_per_step.first().copied().unwrap_or(0),
            stats.token_refusals.get(&10020).copied().unwrap_or(0),
            first_time_all_held.map_or_else(
                || "never within the run".to_owned(),
                |minutes| format!("{minutes:.1} simulated minutes")
            ),
            lapsed_after_coverage,
            real_started.elapsed().as_secs_f64()
        )?;
        // Evenly spread: no 15 s step holds more than twice its even share of the budget.
        let even_share = 450.0 / 20.0;
        writeln!(
            summary,
            "targets: never above 500 per 5 min: {}; evenly spread, no burst at start-up (no 15 s step above twice the even share of {even_share:.1}): {}",
            verdict(busiest_window <= 500),
            verdict(busiest_step as f64 <= 2.0 * even_share)
        )?;
        print!("{summary}");
        setup.sandbox.stop().await;
        Ok(())
    }
}

pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}
