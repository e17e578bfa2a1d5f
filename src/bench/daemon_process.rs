//! `douyin-tokend serve` as a child process the way systemd runs it, shared by
//! the process tests and the benchmarks: a config file, a `NOTIFY_SOCKET` of
//! its own, READY=1 awaited on it (so the daemon binds its own port and says
//! where, with no free-port race and no polling), logs to a file, and a kill
//! if the owner drops it still running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

/// How to start one daemon.
#[derive(Debug, Clone)]
pub struct DaemonLaunch {
    pub binary: PathBuf,
    /// An existing config file; its `listen` should be `127.0.0.1:0`.
    pub config_path: PathBuf,
    /// Where the notify socket is made (a fresh directory of the caller's).
    pub notify_path: PathBuf,
    /// Where stderr (the daemon's logs) goes.
    pub log_path: PathBuf,
    /// Arguments after `serve --config FILE` (e.g. `--log-format json`).
    pub arguments: Vec<String>,
    /// Environment set for the child; everything else is inherited, except
    /// the variables that would steer it away from the config file.
    pub environment: Vec<(String, String)>,
    /// How long READY=1 may take.
    pub patience: Duration,
}

/// The running daemon.
pub struct DaemonProcess {
    child: Child,
    notify_socket: UnixDatagram,
    /// Where gRPC is served, from READY's STATUS.
    pub grpc_address: SocketAddr,
    /// Where metrics are served, when the config asked for them.
    pub metrics_address: Option<SocketAddr>,
    /// Where the webhook listens, when the config turned it on (plain HTTP or TLS).
    pub webhook_address: Option<SocketAddr>,
    pub(crate) log_path: PathBuf,
}

/// Variables a parent environment may hold that would override the config file.
const STEERING_VARIABLES: [&str; 10] = [
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "CREDENTIALS_DIRECTORY",
    "DOUYIN_TOKEND_LISTEN",
    "DOUYIN_TOKEND_DATABASE",
    "DOUYIN_TOKEND_DOUYIN_BASE_URL",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    // Where the daemon writes its reload key: daemons sharing one would
    // overwrite each other's.
    "RUNTIME_DIRECTORY",
    "MAINPID",
];

impl DaemonProcess {
    /// Spawns the daemon and waits for READY=1; fails with the log's path when
    /// it exits first or stays silent past `patience`.
    pub async fn start(launch: &DaemonLaunch) -> anyhow::Result<Self> {
        if !launch.binary.exists() {
            bail!(
                "{} does not exist; build it with `cargo build --release --bins`",
                launch.binary.display()
            );
        }
        let notify_socket = UnixDatagram::bind(&launch.notify_path)
            .with_context(|| format!("cannot bind {}", launch.notify_path.display()))?;
        let log = std::fs::File::create(&launch.log_path)
            .with_context(|| format!("cannot create {}", launch.log_path.display()))?;
        let mut command = Command::new(&launch.binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&launch.config_path)
            .args(&launch.arguments);
        for variable in STEERING_VARIABLES {
            command.env_remove(variable);
        }
        command
            .env("NOTIFY_SOCKET", &launch.notify_path)
            .envs(launch.environment.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", launch.binary.display()))?;
        let log_path = launch.log_path.clone();
        let ready = tokio::select! {
            ready = receive(&notify_socket, launch.patience) => ready.with_context(|| {
                format!("no READY=1 within {:?}; the daemon's log: {}", launch.patience, log_path.display())
            })?,
            exited = child.wait() => bail!(
                "the daemon exited ({}) before READY=1; its log: {}",
                exited.map_or_else(|error| error.to_string(), |status| status.to_string()),
                log_path.display()
            ),
        };
        if !ready.starts_with("READY=1\n") {
            bail!("the daemon's first notification is not READY=1: {ready:?}");
        }
        let status = ready
            .lines()
            .find_map(|line| line.strip_prefix("STATUS="))
            .context("READY=1 came without a STATUS")?;
        let grpc_address = address_after(status, "serving gRPC on ")
            .with_context(|| format!("the STATUS names no gRPC address: {status:?}"))?;
        Ok(Self {
            child,
            notify_socket,
            grpc_address,
            metrics_address: address_after(status, "metrics on http://"),
            webhook_address: address_after(status, "webhook on http://")
                .or_else(|| address_after(status, "webhook on https://")),
            log_path,
        })
    }

    /// The next datagram on the notify socket, or None within `within`.
    pub async fn notification_within(&self, within: Duration) -> Option<String> {
        receive(&self.notify_socket, within).await
    }

    /// The child's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (a name such as `TERM` or `HUP`) with kill(1).
    pub fn send_signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("the daemon has exited")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// Waits up to `within` for the process to exit.
    pub async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()?
            .ok()
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The gRPC address as a URL for tonic.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_address)
    }
}

async fn receive(socket: &UnixDatagram, within: Duration) -> Option<String> {
    let mut buffer = vec![0u8; 4096];
    let length = tokio::time::timeout(within, socket.recv(&mut buffer))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buffer[..length]).into_owned())
}

/// The socket address that follows `marker` in a STATUS line.
fn address_after(status: &str, marker: &str) -> Option<SocketAddr> {
    let start = status.find(marker)? + marker.len();
    let rest = &status[start..];
    let end = rest.find([',', '/', ' ']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_from_the_ready_status() {
        let status = "serving gRPC on 127.0.0.1:4321, metrics on http://127.0.0.1:9100/metrics, webhook on https://127.0.0.1:8443/douyin/webhook";
        assert_eq!(
            address_after(status, "webhook on https://"),
            Some("127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(
            address_after(status, "serving gRPC on "),
            Some("127.0.0.1:4321".parse().unwrap())
        );
        assert_eq!(
            address_after(status, "metrics on http://"),
            Some("127.0.0.1:9100".parse().unwrap())
        );
        assert_eq!(
            address_after("serving gRPC on unix:/run/x", "serving gRPC on "),
            None
        );
    }
}
