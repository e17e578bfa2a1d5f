//! The long runs over many token lifetimes, accelerated: the soak's short
//! form (ten simulated minutes of steady lookups and token requests with 30 s
//! tokens, 5 % transient faults, failed scheduled refreshes and tokens
//! invalidated behind the daemon's back, on a manual clock: no sleeping; it
//! fails when an endurance property regresses: a token error reaches a
//! caller, Douyin sees 2119003, or the daemon fetches more than 5 % above the
//! fewest tokens its refresh window allows; `douyin-bench soak` is the
//! real-time form), and three daemon processes on one PostgreSQL database
//! over 18-second tokens in real time, refreshing in the window with no
//! rejected token and no wasted fetch.
//!
//! They are the binary's longest tests (half a minute each). libtest starts
//! tests in name order, a few at a time, and this module's name sorts first:
//! they start at once and the rest run beside them, instead of starting
//! after most of the others and running on alone.

use std::time::{Duration, Instant};

use douyin_tokend::bench::daemon_process::DaemonProcess;
use douyin_tokend::bench::fleet::Fleet;
use douyin_tokend::bench::soak::{SoakPlan, minimum_fetches, run_simulated};
use douyin_tokend::sandbox::SandboxConfig;

use crate::cluster::{ClusterSetup, SteadyLookups, logs_above_debug};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_simulated_minutes_of_faults_and_invalidations_cost_callers_nothing() {
    // 8 apps × 5 lookups/s, 30 s tokens: 20 token lifetimes, 7 invalidations.
    let plan = SoakPlan::default();
    let report = run_simulated(&plan).await.unwrap();
    println!("{report:#?}");

    assert_eq!(report.lookups, 600 * 8 * 5);
    assert_eq!(report.token_errors, 0, "token errors reached callers");
    assert_eq!(report.too_many_requests, 0, "Douyin saw 2119003");
    assert!(
        report.lookup_faults_injected as f64 >= report.lookups as f64 * 0.04,
        "the faults were injected: {}",
        report.lookup_faults_injected
    );
    assert!(report.invalidations >= 7, "{}", report.invalidations);
    assert!(
        report.token_rejections >= report.invalidations,
        "every invalidation was noticed through a rejection"
    );
    // (A failed refresh retried a second later shifts that app's schedule, so
    // the count may even end a little below the fault-free minimum.)
    assert!(
        report.excess_fetch_fraction() <= 0.05,
        "{} fetches for a minimum of {} ({:+.1} %)",
        report.token_fetches,
        report.minimum_fetches,
        report.excess_fetch_fraction() * 100.0
    );
    // Transient failures are retried inside the daemon; the rare one that
    // fails all three tries reaches the caller as UNAVAILABLE, and nothing else does.
    let other_errors: u64 = report.other_errors.values().sum();
    assert!(
        other_errors * 1000 <= report.lookups,
        "more than 0.1 % of lookups failed: {:?}",
        report.other_errors
    );
}

/// Tokens live 18 s instead of Douyin's two hours, so half a minute of real
/// time holds several rotations. 18 s is the shortest lifetime the window
/// below allows: a refresh comes at least 18 s − 9 s = 9 s after the fetch
/// before it, so any three fetches of an app span at least the lifetime, and
/// the cluster's rule of at most two scheduled fetches per app within a
/// lifetime (Douyin's grace, when shorter) never holds one back.
const SHORT_TOKEN_LIFETIME: Duration = Duration::from_secs(18);
/// Douyin's five-minute grace scaled to that lifetime would be under a second
/// (300 s / 7200 s × 18 s ≈ 0.75 s), less than the second the cluster promises
/// for a new token to reach every daemon. 2 s keeps a replaced token dying
/// long before its own expiry, so a daemon left on it (a notification lost)
/// is rejected, while leaving that promise room.
const SHORT_GRACE: Duration = Duration::from_secs(2);
/// The refresh window scaled as the soak scales it: narrow (1 s), so a wasted
/// fetch shows against the minimum, and closing 3 s before the token stops
/// being servable (5 s before expiry), so a sweep ticking late still
/// refreshes before any caller has to wait for a token.
const SHORT_WINDOW_START: Duration = Duration::from_secs(9);
const SHORT_WINDOW_END: Duration = Duration::from_secs(8);
/// How long the accelerated run offers lookups, counted from before the first
/// daemon starts: almost two lifetimes, in which each app's first token (a
/// second or three in, as the daemons start) is followed by three refreshes,
/// one every 9 to 11 s (the window, and a sweep up to a second late).
const ACCELERATED_RUN: Duration = Duration::from_secs(35);
/// Refreshes every app must have had by the end of the run, even with the
/// daemons slow to start: a run that rotates no token proves nothing about
/// rotations.
const ACCELERATED_RUN_ROTATIONS_AT_LEAST: u64 = 2;
/// The daemons' `[refresh]` table for [`SHORT_TOKEN_LIFETIME`]: the short
/// window, a sweep every second (six fields, seconds first), no minimum
/// interval beyond a second, quick backoff.
fn short_lifetime_refresh_table() -> String {
    format!(
        "[refresh]\nwindow_start = \"{}s\"\nwindow_end = \"{}s\"\nmin_interval = \"1s\"\nsweep = \"* * * * * *\"\nbackoff_initial = \"1s\"\nbackoff_max = \"4s\"\n",
        SHORT_WINDOW_START.as_secs(),
        SHORT_WINDOW_END.as_secs()
    )
}

/// The "fetching client_token" lines of a caller that had to wait for a token
/// (reason "reactive") for a generation above the first: each is a refresh
/// that came too late, since a proactive refresh in the window would have
/// replaced the token before it stopped serving.
fn late_reactive_fetches(daemon: &DaemonProcess) -> Vec<String> {
    daemon
        .logs()
        .lines()
        .filter(|line| {
            line.contains("fetching client_token") && line.contains("reason=\"reactive\"")
        })
        .filter(|line| {
            line.split_once("generation=")
                .and_then(|(_, rest)| {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse::<i64>().ok()
                })
                .is_none_or(|generation| generation > 1)
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_on_short_lived_tokens_serve_steadily_with_no_rejection_and_no_wasted_fetch()
{
    let fleet = Fleet {
        apps: 2,
        merchants: 2,
    };
    let setup = ClusterSetup::new(
        fleet,
        SandboxConfig {
            token_lifetime: SHORT_TOKEN_LIFETIME,
            grace: SHORT_GRACE,
            ..SandboxConfig::default()
        },
    )
    .await;
    let refresh_table = short_lifetime_refresh_table();
    // No token exists before this moment, so every fetch the sandbox counts
    // falls inside the span measured from here.
    let started = Instant::now();
    // Started together: their first sweeps race for each app's first token.
    let (first, second, third) = tokio::join!(
        setup.spawn_daemon_with(1, &refresh_table),
        setup.spawn_daemon_with(2, &refresh_table),
        setup.spawn_daemon_with(3, &refresh_table),
    );
    let daemons = [&first, &second, &third];
    let load = SteadyLookups::start(fleet, &daemons).await;
    // The run's length, not an event: the load goes on meanwhile.
    tokio::time::sleep_until((started + ACCELERATED_RUN).into()).await;
    let (sent, failures) = load.stop().await;
    // Read together: every fetch counted happened within `elapsed`.
    let stats = setup.sandbox.state().stats();
    let elapsed = started.elapsed();

    assert!(
        failures.is_empty(),
        "{} of {sent} lookups failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        logs_above_debug(&daemons)
    );
    assert_eq!(
        stats.token_rejections(),
        0,
        "Douyin rejected tokens the cluster handed out\n{}",
        logs_above_debug(&daemons)
    );
    assert_eq!(
        stats.lookup_window_overruns, 0,
        "no 2119003 from the cluster"
    );
    // The minimum: a token serves at most until the refresh window's last
    // moment, lifetime − window_end = 18 s − 8 s = 10 s after its fetch, so a
    // span of `elapsed` seconds (the first fetch is inside it) needs at least
    // ceil(elapsed / 10 s) fetches per app: ceil(35.x / 10) = 4. Refreshing
    // anywhere in the 1 s window and a sweep up to a second late cost at most
    // one more over the run; 5 % of 4, rounded up, is that one fetch.
    let minimum = minimum_fetches(elapsed, SHORT_TOKEN_LIFETIME, SHORT_WINDOW_END, &[vec![]]);
    let allowed = (minimum as f64 * 1.05).ceil() as u64;
    let issued: Vec<u64> = (0..fleet.apps)
        .map(|app| stats.tokens_issued_for(&fleet.client_key(app)))
        .collect();
    eprintln!(
        "accelerated run: {:.1} s, {sent} lookups through 3 daemons, tokens per app {issued:?}, minimum {minimum}, allowed {allowed}",
        elapsed.as_secs_f64()
    );
    for (app, issued) in issued.iter().enumerate() {
        assert!(
            *issued > ACCELERATED_RUN_ROTATIONS_AT_LEAST,
            "app {app}: {issued} tokens in {elapsed:?}, not {ACCELERATED_RUN_ROTATIONS_AT_LEAST} refreshes after the first\n{}",
            logs_above_debug(&daemons)
        );
        assert!(
            *issued <= allowed,
            "app {app}: {issued} tokens in {elapsed:?}; the minimum is {minimum}, at most {allowed} allowed\n{}",
            logs_above_debug(&daemons)
        );
    }
    // Fewer fetches than the minimum would mean tokens served past the
    // window; the refreshes came in the window instead, so no caller waited
    // for a token after the first and health never dropped.
    for daemon in daemons {
        let late = late_reactive_fetches(daemon);
        assert!(
            late.is_empty(),
            "refreshes came only when a caller needed the token: {late:#?}\n{}",
            logs_above_debug(&daemons)
        );
        assert!(
            !daemon.logs().contains("health NOT_SERVING"),
            "a daemon had no token to hand out\n{}",
            logs_above_debug(&daemons)
        );
    }
}
