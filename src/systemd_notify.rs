//! systemd's service notification protocol (`sd_notify`): READY, RELOADING,
//! STOPPING, STATUS and WATCHDOG datagrams to `$NOTIFY_SOCKET`, and the
//! watchdog pinger that keeps pinging only while the refresh sweep keeps
//! completing, so a stuck scheduler gets the service restarted.
//!
//! The protocol is one `KEY=VALUE` line per field in a single datagram to a
//! Unix socket (a path, or an abstract name written with a leading `@`). It is
//! small enough to write here rather than pull in a crate for it.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Talks to systemd's notify socket; does nothing when the daemon was not
/// started by systemd (no `$NOTIFY_SOCKET`). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct SystemdNotifier {
    socket: Option<NotifySocket>,
    watchdog_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NotifySocket {
    Path(PathBuf),
    /// A Linux abstract socket name (given as `@name`; sent without the `@`).
    Abstract(Vec<u8>),
}

impl SystemdNotifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` as systemd
    /// sets them for `Type=notify` services with `WatchdogSec=`.
    pub fn from_environment() -> Self {
        Self::from_variables(|name| std::env::var(name).ok(), std::process::id())
    }

    /// Talks to the socket at `path`, with a watchdog when one is given; for tests.
    #[cfg(test)]
    fn to_socket(path: impl Into<PathBuf>, watchdog_timeout: Option<Duration>) -> Self {
        Self {
            socket: Some(NotifySocket::Path(path.into())),
            watchdog_timeout,
        }
    }

    fn from_variables(lookup: impl Fn(&str) -> Option<String>, own_pid: u32) -> Self {
        let socket = lookup("NOTIFY_SOCKET")
            .filter(|value| !value.is_empty())
            .map(|value| match value.strip_prefix('@') {
                Some(name) => NotifySocket::Abstract(name.as_bytes().to_vec()),
                None => NotifySocket::Path(PathBuf::from(value)),
            });
        // WATCHDOG_PID names the process the watchdog is meant for; a child
        // that inherited the variables must not ping on the parent's behalf.
        let watchdog_is_ours = lookup("WATCHDOG_PID")
            .is_none_or(|pid| pid.trim().parse::<u32>().ok() == Some(own_pid));
        let watchdog_timeout =
            watchdog_timeout_in(lookup("WATCHDOG_USEC").as_deref()).filter(|_| watchdog_is_ours);
        Self {
            watchdog_timeout: socket.as_ref().and(watchdog_timeout),
            socket,
        }
    }

    /// `WatchdogSec=` as systemd passed it, when the watchdog is on.
    ///
    /// (See also [`watchdog_timeout_in`], which reads the variable alone.)
    pub(crate) fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog_timeout
    }

    /// Start-up finished: the database is migrated, tokens are loaded and
    /// the listeners are bound. `status` shows in `systemctl status`.
    pub(crate) fn ready(&self, status: &str) {
        self.send_logged(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A configuration reload began; follow with [`SystemdNotifier::ready`].
    pub(crate) fn reloading(&self) {
        self.send_logged("RELOADING=1\nSTATUS=reloading the configuration");
    }

    /// Shutdown began.
    pub(crate) fn stopping(&self, status: &str) {
        self.send_logged(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// Tells systemd the daemon is alive.
    pub(crate) fn watchdog_ping(&self) {
        self.send_logged("WATCHDOG=1");
    }

    /// Sends one datagram; Ok(()) without a socket.
    pub(crate) fn send(&self, message: &str) -> io::Result<()> {
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        let sender = UnixDatagram::unbound()?;
        match socket {
            NotifySocket::Path(path) => sender.send_to(message.as_bytes(), path)?,
            NotifySocket::Abstract(name) => send_to_abstract(&sender, name, message)?,
        };
        Ok(())
    }

    fn send_logged(&self, message: &str) {
        if let Err(error) = self.send(message) {
            // systemd will notice the missing notification (start timeout,
            // watchdog); the daemon itself can go on serving.
            tracing::warn!(%error, "cannot notify systemd");
        }
    }
}

#[cfg(target_os = "linux")]
fn send_to_abstract(sender: &UnixDatagram, name: &[u8], message: &str) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sender.send_to_addr(message.as_bytes(), &address)
}

#[cfg(not(target_os = "linux"))]
fn send_to_abstract(_sender: &UnixDatagram, _name: &[u8], _message: &str) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract notify sockets exist only on Linux",
    ))
}

/// A STATUS value must stay on one line: a newline would start another field.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// What feeds systemd's watchdog.
pub(crate) enum WatchdogFeed {
    /// Ping only while this counter (completed refresh sweeps) has moved
    /// within the last watchdog timeout.
    SweepHeartbeat(watch::Receiver<u64>),
    /// The sweep is switched off: ping while the runtime runs at all.
    RuntimeOnly,
}

/// Pings systemd's watchdog every half timeout for as long as `feed` shows
/// life, until `stop` is cancelled. A heartbeat that has not moved for a whole
/// timeout stops the pings, and systemd restarts the service.
pub(crate) async fn run_watchdog(
    notifier: SystemdNotifier,
    timeout: Duration,
    feed: WatchdogFeed,
    stop: CancellationToken,
) {
    // The first ping after half a timeout, like every later one: READY=1
    // comes first, and systemd wants a ping within the timeout.
    let mut ticks = tokio::time::interval_at(Instant::now() + timeout / 2, timeout / 2);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (requires_beats, mut heartbeat) = match feed {
        WatchdogFeed::SweepHeartbeat(heartbeat) => (true, Some(heartbeat)),
        WatchdogFeed::RuntimeOnly => (false, None),
    };
    // The start counts as a beat: the first sweep gets a whole timeout to finish.
    let mut last_beat = Instant::now();
    let mut silent = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            beat = next_beat(heartbeat.as_mut()) => {
                if beat {
                    last_beat = Instant::now();
                } else {
                    // The token manager is gone: nothing will beat again.
                    heartbeat = None;
                }
            }
            _ = ticks.tick() => {
                let stalled_for = last_beat.elapsed();
                if !requires_beats || stalled_for < timeout {
                    notifier.watchdog_ping();
                    if silent {
                        tracing::info!("the refresh sweep completes again; watchdog pings resumed");
                    }
                    silent = false;
                } else if !silent {
                    tracing::error!(
                        stalled_s = stalled_for.as_secs(),
                        "no refresh sweep completed within the watchdog timeout; watchdog pings stop, so systemd restarts the daemon"
                    );
                    silent = true;
                }
            }
        }
    }
}

/// Completes with true on the next beat, or false when the sender is gone;
/// never completes without a heartbeat.
async fn next_beat(heartbeat: Option<&mut watch::Receiver<u64>>) -> bool {
    match heartbeat {
        Some(heartbeat) => heartbeat.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// The watchdog timeout in `WATCHDOG_USEC`'s text (microseconds; none when
/// absent, zero or not a number), as systemd sets it from `WatchdogSec=`.
pub fn watchdog_timeout_in(watchdog_usec: Option<&str>) -> Option<Duration> {
    watchdog_usec
        .and_then(|usec| usec.trim().parse::<u64>().ok())
        .filter(|usec| *usec > 0)
        .map(Duration::from_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variables(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(candidate, _)| candidate == name)
                .map(|(_, value)| value.clone())
        }
    }

    #[test]
    fn the_environment_names_the_socket_and_the_watchdog_meant_for_this_process() {
        let notifier = SystemdNotifier::from_variables(
            variables(&[
                ("NOTIFY_SOCKET", "/run/systemd/notify"),
                ("WATCHDOG_USEC", "60000000"),
                ("WATCHDOG_PID", "42"),
            ]),
            42,
        );
        assert_eq!(
            notifier.socket,
            Some(NotifySocket::Path("/run/systemd/notify".into()))
        );
        assert_eq!(notifier.watchdog_timeout(), Some(Duration::from_secs(60)));

        let inherited = SystemdNotifier::from_variables(
            variables(&[
                ("NOTIFY_SOCKET", "@abstract/notify"),
                ("WATCHDOG_USEC", "60000000"),
                ("WATCHDOG_PID", "41"),
            ]),
            42,
        );
        assert_eq!(
            inherited.socket,
            Some(NotifySocket::Abstract(b"abstract/notify".to_vec()))
        );
        assert_eq!(inherited.watchdog_timeout(), None);

        let outside_systemd =
            SystemdNotifier::from_variables(variables(&[("WATCHDOG_USEC", "1000")]), 42);
        assert_eq!(outside_systemd.socket, None);
        assert_eq!(outside_systemd.watchdog_timeout(), None);
        outside_systemd.send("READY=1").unwrap();
    }

    #[test]
    fn messages_arrive_as_one_datagram_with_the_status_on_one_line() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = SystemdNotifier::to_socket(&path, None);
        notifier.ready("serving gRPC on 127.0.0.1:1\nand more");
        notifier.stopping("stopping");
        let mut buffer = [0u8; 512];
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(
            std::str::from_utf8(&buffer[..length]).unwrap(),
            "READY=1\nSTATUS=serving gRPC on 127.0.0.1:1 and more"
        );
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(
            std::str::from_utf8(&buffer[..length]).unwrap(),
            "STOPPING=1\nSTATUS=stopping"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_sockets_are_reached_by_their_at_sign_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("douyin-tokend-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        let notifier = SystemdNotifier::from_variables(
            variables(&[("NOTIFY_SOCKET", &format!("@{name}"))]),
            1,
        );
        notifier.watchdog_ping();
        let mut buffer = [0u8; 64];
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"WATCHDOG=1");
    }

    async fn next_message(socket: &tokio::net::UnixDatagram) -> String {
        let mut buffer = [0u8; 512];
        let length = socket.recv(&mut buffer).await.unwrap();
        String::from_utf8(buffer[..length].to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_stop_when_the_sweep_stops_and_resume_when_it_completes_again() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        let timeout = Duration::from_secs(10);
        let notifier = SystemdNotifier::to_socket(&path, Some(timeout));
        let (beats, heartbeat) = watch::channel(0u64);
        let stop = CancellationToken::new();
        let pinger = tokio::spawn(run_watchdog(
            notifier,
            timeout,
            WatchdogFeed::SweepHeartbeat(heartbeat),
            stop.clone(),
        ));
        let started = Instant::now();

        // Sweeps completing every 3 s keep the pings coming every 5 s.
        let sweeping = tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                beats.send_modify(|count| *count += 1);
            }
            beats
        });
        for _ in 0..4 {
            assert_eq!(next_message(&socket).await, "WATCHDOG=1");
        }
        let beats = sweeping.await.unwrap();
        let last_beat = Instant::now();

        // The sweep stops at 18 s: pings go on while the last beat is fresh,
        // then stop for good.
        let mut last_ping = Instant::now();
        while let Ok(message) =
            tokio::time::timeout(Duration::from_secs(60), next_message(&socket)).await
        {
            assert_eq!(message, "WATCHDOG=1");
            last_ping = Instant::now();
        }
        assert!(
            last_ping - last_beat < timeout,
            "a ping {:?} after the last beat",
            last_ping - last_beat
        );
        assert!(started.elapsed() > Duration::from_secs(60));

        // A sweep completing again brings the pings back.
        beats.send_modify(|count| *count += 1);
        assert_eq!(next_message(&socket).await, "WATCHDOG=1");
        stop.cancel();
        pinger.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_sweep_the_watchdog_pings_while_the_runtime_runs() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        let timeout = Duration::from_secs(10);
        let stop = CancellationToken::new();
        let pinger = tokio::spawn(run_watchdog(
            SystemdNotifier::to_socket(&path, Some(timeout)),
            timeout,
            WatchdogFeed::RuntimeOnly,
            stop.clone(),
        ));
        for _ in 0..5 {
            assert_eq!(next_message(&socket).await, "WATCHDOG=1");
        }
        stop.cancel();
        pinger.await.unwrap();
    }
}
