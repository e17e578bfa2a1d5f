//! A private PostgreSQL server for tests and benchmarks that need one: a data
//! directory fresh from `initdb` in a new temporary directory, `postgres`
//! listening only on a Unix socket in that directory (no TCP), one database
//! per test made with `psql`, stop and start again on the same data for
//! outage tests, and everything (process and directory) gone when the owner
//! drops it. `initdb` runs once for the servers a process has alive at a
//! time: each copies that pristine data directory instead (see
//! [`DataTemplate`]). Uses Debian's `postgresql` package from
//! /usr/lib/postgresql/<version>/bin.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

/// Where Debian's `postgresql-<version>` packages put their programs.
const DEBIAN_POSTGRESQL: &str = "/usr/lib/postgresql";
/// The superuser `initdb` creates; trusted on the socket, no password.
const SUPERUSER: &str = "tokend";
/// The port in the socket's name (`.s.PGSQL.<port>`). Any number will do:
/// the socket lives in a private directory and nothing listens on TCP, so
/// servers in parallel tests never collide on it.
const DEFAULT_PORT: u16 = 5432;
/// How long the server may take to accept connections after it is started,
/// and to exit after it is told to stop. Generous: two cores run the tests
/// in parallel.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long `Drop` waits for an immediate shutdown before SIGKILL.
const DROP_PATIENCE: Duration = Duration::from_secs(10);
/// A Unix socket path must fit `sun_path` (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Lines of the server's log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// A running (or stopped, see [`PostgresServer::stop`]) PostgreSQL server of
/// the test's own. The directory holds `data/` (the cluster, copied from the
/// [`DataTemplate`]), the socket and `postgres.log` (the server's output;
/// `initdb`'s is in the template's directory, and in the error if it fails).
///
/// When the test runs as root (CI does), `initdb` and `postgres`, which
/// refuse root, run as `nobody`, and the directories are chowned to it; every
/// directory above `std::env::temp_dir()` must then be searchable by
/// `nobody` (/tmp is).
///
/// The server runs with `fsync=off`, `synchronous_commit=off` and
/// `full_page_writes=off`: they only matter if the machine crashes, and then
/// the cluster is thrown away with the test anyway; with them on, every
/// commit waits for the disk and the tests crawl.
///
/// Waits (readiness, shutdown) are bounded by the real clock, not tokio's, so
/// a test that pauses tokio's time cannot time them out early.
pub struct PostgresServer {
    directory: TempDir,
    binaries: PathBuf,
    port: u16,
    /// (uid, gid) the server runs as when the test runs as root.
    run_as: Option<(u32, u32)>,
    /// The postmaster, while it runs.
    child: Option<Child>,
    /// The pristine data directory this server's was copied from, kept
    /// while the server lives so the next server to start copies it too.
    template: Arc<DataTemplate>,
}

/// A data directory as `initdb` left it, never started, which servers copy
/// into their own directory instead of running `initdb` each: `initdb`
/// costs about two seconds of CPU, most of a server's start, and the
/// PostgreSQL tests start a dozen servers on two cores; a copy costs a
/// fraction of that. The servers alive in one process share it (see
/// [`shared_template`]); the last one to go removes it, so nothing is left
/// behind, and the next server to start makes a new one.
struct DataTemplate {
    directory: TempDir,
}

impl DataTemplate {
    fn data_directory(&self) -> PathBuf {
        self.directory.path().join("data")
    }
}

/// The template of the servers alive in this process, if any. A tokio mutex:
/// whoever finds none runs `initdb` while holding it, and servers starting
/// meanwhile wait for that template rather than making their own.
static TEMPLATE: tokio::sync::Mutex<Weak<DataTemplate>> =
    tokio::sync::Mutex::const_new(Weak::new());

impl PostgresServer {
    /// initdb into a fresh temp directory, start `postgres` listening only on
    /// a Unix socket in that directory (`listen_addresses = ''`), wait until it
    /// accepts connections; returns when ready.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on_port(DEFAULT_PORT).await
    }

    async fn start_on_port(port: u16) -> anyhow::Result<Self> {
        let binaries = find_binaries()?;
        let run_as = if effective_uid()? == 0 {
            Some(nobody()?)
        } else {
            None
        };
        let directory = tempfile::Builder::new()
            .prefix("postgres-")
            .tempdir()
            .context("cannot create a temporary directory for PostgreSQL")?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(directory.path(), Some(uid), Some(gid)).with_context(
                || format!("cannot chown {} to nobody", directory.path().display()),
            )?;
        }
        let template = shared_template(&binaries, run_as).await?;
        let mut server = Self {
            directory,
            binaries,
            port,
            run_as,
            child: None,
            template,
        };
        let socket = server.socket_path();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the socket path {} is longer than {MAX_SOCKET_PATH} bytes; point TMPDIR at a shorter directory",
                socket.display()
            );
        }
        server.copy_template().await?;
        server.start_again().await?;
        Ok(server)
    }

    /// The directory holding the Unix socket (for sqlx
    /// `PgConnectOptions::socket`, or libpq's `host=<directory>`).
    pub fn socket_directory(&self) -> &Path {
        self.directory.path()
    }

    /// The port number in the socket file's name, `.s.PGSQL.<port>`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The database superuser's name (trusted on the socket, no password).
    pub fn user(&self) -> &str {
        SUPERUSER
    }

    /// The directory `initdb`, `postgres` and `psql` come from.
    pub fn bin_directory(&self) -> &Path {
        &self.binaries
    }

    /// The postmaster's pid while the server runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// A URL for `database` that both sqlx 0.9 (`PgConnectOptions::from_str`)
    /// and libpq (`psql`) read as "this socket directory, this port, this
    /// user":
    ///
    /// `postgres:///<database>?host=<socket directory>&port=<port>&user=tokend`
    ///
    /// with the database name and the directory percent-encoded. sqlx takes a
    /// `host` query value starting with `/` as the socket directory. The
    /// shorter `postgres://tokend@/<database>?host=...` does not parse there:
    /// the `url` crate rejects an empty host after `user@`, so the user goes
    /// in the query too.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres:///{}?host={}&port={}&user={}",
            percent_encode(database.as_bytes(), b""),
            percent_encode(self.socket_directory().as_os_str().as_bytes(), b"/"),
            self.port,
            percent_encode(SUPERUSER.as_bytes(), b""),
        )
    }

    /// `CREATE DATABASE <name>` with `psql` over the socket (no sqlx), so each
    /// test gets its own database on one server.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_identifier(name)),
        )
        .await
        .with_context(|| format!("cannot create database {name:?}"))?;
        Ok(())
    }

    /// Runs `sql` in `database` with `psql -X -q -A -t -v ON_ERROR_STOP=1`,
    /// connecting with [`Self::url`]; returns what it printed (unaligned rows,
    /// no headers).
    pub async fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let psql = self.psql_binary();
        let mut command = Command::new(&psql);
        remove_libpq_environment(&mut command);
        let output = command
            // A bounded connect; the server is local, so 10 s means it is wedged.
            .env("PGCONNECT_TIMEOUT", "10")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(database))
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("cannot run {}", psql.display()))?;
        if !output.status.success() {
            bail!(
                "psql {:?} in {database:?} failed ({}): {}",
                sql,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Stops the server (fast shutdown: SIGINT to the postmaster, which ends
    /// the sessions and checkpoints) and waits for it, keeping the data
    /// directory; [`Self::start_again`] starts it on the same directory and
    /// port. For outage tests.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("the server is not running")?;
        let pid = child.id().context("the server has already been reaped")?;
        send_signal(pid, "INT")?;
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            () = real_deadline(Instant::now() + PATIENCE) => None,
        };
        match exited {
            Some(status) => {
                let status = status.context("cannot wait for postgres")?;
                if !status.success() {
                    bail!(
                        "postgres exited with {status} on a fast shutdown; the end of its log:\n{}",
                        self.log_tail()
                    );
                }
                Ok(())
            }
            None => {
                // Immediate shutdown, then the hard way; the cluster may need
                // crash recovery on the next start, which postgres does itself.
                stop_now(&mut child);
                bail!(
                    "postgres did not stop within {PATIENCE:?} of SIGINT and was killed; the end of its log:\n{}",
                    self.log_tail()
                )
            }
        }
    }

    /// Starts the server on the existing data directory and port (after
    /// [`Self::stop`]) and waits until it accepts connections.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the server is already running");
        }
        let postgres = self.binaries.join("postgres");
        let mut command = self.server_command(&postgres)?;
        command
            .arg("-D")
            .arg(self.data_directory())
            .arg("-k")
            .arg(self.socket_directory())
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ])
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", postgres.display()))?;
        self.child = Some(child);
        if let Err(error) = self.wait_until_ready().await {
            if let Some(mut child) = self.child.take() {
                stop_now(&mut child);
            }
            return Err(error);
        }
        Ok(())
    }

    /// This server's data directory, a copy of the template's (`cp -a`, so
    /// owner and modes come along: as root, the files stay `nobody`'s).
    async fn copy_template(&self) -> anyhow::Result<()> {
        let template = self.template.data_directory();
        let output = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(self.data_directory())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("cannot run cp")?;
        if !output.status.success() {
            bail!(
                "cannot copy {} to {} ({}): {}",
                template.display(),
                self.data_directory().display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// `postgres`, as `nobody` when root, in the server's directory, output
    /// appended to the log.
    fn server_command(&self, program: &Path) -> anyhow::Result<Command> {
        command_in(program, self.socket_directory(), self.run_as)
    }

    /// Until a startup packet gets AuthenticationOk: the socket appears a
    /// little before the server accepts sessions ("the database system is
    /// starting up"), which is what clients care about. Fails early, with the
    /// log's end, if the server exits.
    async fn wait_until_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        let socket = self.socket_path();
        let mut pause = Duration::from_millis(2);
        loop {
            let probe = tokio::select! {
                probe = probe(&socket) => probe,
                () = real_deadline(deadline) => Probe::NotYet("the probe itself hung".into()),
            };
            let not_yet = match probe {
                Probe::Ready => return Ok(()),
                Probe::Refused(message) => bail!(
                    "postgres refused the readiness probe: {message}; the end of its log:\n{}",
                    self.log_tail()
                ),
                Probe::NotYet(why) => why,
            };
            let child = self.child.as_mut().context("the server is not running")?;
            if let Some(status) = child.try_wait().context("cannot check on postgres")? {
                self.child = None;
                bail!(
                    "postgres exited ({status}) before accepting connections; the end of its log:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "postgres did not accept connections within {PATIENCE:?} (last: {not_yet}); the end of its log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    fn data_directory(&self) -> PathBuf {
        self.directory.path().join("data")
    }

    fn socket_path(&self) -> PathBuf {
        self.socket_directory()
            .join(format!(".s.PGSQL.{}", self.port))
    }

    fn log_path(&self) -> PathBuf {
        log_path_in(self.directory.path())
    }

    /// The versioned bin directory's `psql`, else the one on the PATH.
    fn psql_binary(&self) -> PathBuf {
        let versioned = self.binaries.join("psql");
        if versioned.exists() {
            versioned
        } else {
            PathBuf::from("psql")
        }
    }

    /// Everything initdb and the server logged so far (`postgres.log`).
    pub fn logs(&self) -> String {
        std::fs::read(self.log_path())
            .map(|log| String::from_utf8_lossy(&log).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of `postgres.log`.
    fn log_tail(&self) -> String {
        log_tail_in(self.directory.path())
    }
}

/// The template of the servers alive in this process, made now (`initdb`)
/// if there is none.
async fn shared_template(
    binaries: &Path,
    run_as: Option<(u32, u32)>,
) -> anyhow::Result<Arc<DataTemplate>> {
    let mut shared = TEMPLATE.lock().await;
    if let Some(template) = shared.upgrade() {
        return Ok(template);
    }
    let directory = tempfile::Builder::new()
        .prefix("postgres-template-")
        .tempdir()
        .context("cannot create a temporary directory for PostgreSQL's template")?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(directory.path(), Some(uid), Some(gid))
            .with_context(|| format!("cannot chown {} to nobody", directory.path().display()))?;
    }
    let template = Arc::new(DataTemplate { directory });
    initdb(binaries, run_as, &template).await?;
    *shared = Arc::downgrade(&template);
    Ok(template)
}

/// `initdb` into the template's `data`: trust on the socket, the superuser
/// [`SUPERUSER`], UTF8 and the C locale, no fsync (nothing here outlives a
/// crash).
async fn initdb(
    binaries: &Path,
    run_as: Option<(u32, u32)>,
    template: &DataTemplate,
) -> anyhow::Result<()> {
    let initdb = binaries.join("initdb");
    let mut command = command_in(&initdb, template.directory.path(), run_as)?;
    command
        .arg("-D")
        .arg(template.data_directory())
        .args(["-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--locale=C"])
        .arg("--no-sync")
        .kill_on_drop(true);
    let status = command
        .status()
        .await
        .with_context(|| format!("cannot run {}", initdb.display()))?;
    if !status.success() {
        let hint = if run_as.is_some() {
            format!(
                " (it ran as nobody, since the test runs as root: every directory above {} must be searchable by nobody)",
                template.directory.path().display()
            )
        } else {
            String::new()
        };
        bail!(
            "initdb failed ({status}){hint}; the end of its output:\n{}",
            log_tail_in(template.directory.path())
        );
    }
    Ok(())
}

/// `program` (`initdb` or `postgres`) as `nobody` when root, working in
/// `directory` (the test's working directory may be closed to `nobody`),
/// output appended to `directory`'s `postgres.log`.
fn command_in(
    program: &Path,
    directory: &Path,
    run_as: Option<(u32, u32)>,
) -> anyhow::Result<Command> {
    let log_path = log_path_in(directory);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut command = Command::new(program);
    remove_libpq_environment(&mut command);
    command
        .current_dir(directory)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot duplicate the log file")?)
        .stderr(log);
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid);
    }
    Ok(command)
}

/// `postgres.log` in a server's (or the template's) directory.
fn log_path_in(directory: &Path) -> PathBuf {
    directory.join("postgres.log")
}

/// The last lines of `directory`'s `postgres.log`.
fn log_tail_in(directory: &Path) -> String {
    let log_path = log_path_in(directory);
    let log = match std::fs::read(&log_path) {
        Ok(log) => String::from_utf8_lossy(&log).into_owned(),
        Err(error) => return format!("(cannot read {}: {error})", log_path.display()),
    };
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

impl Drop for PostgresServer {
    /// Immediate shutdown (SIGQUIT: the postmaster ends its children at once
    /// and exits), reaped so not even a zombie is left; SIGKILL if that takes
    /// more than [`DROP_PATIENCE`]. The directory goes afterwards, with the
    /// `TempDir`.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_now(&mut child);
        }
    }
}

/// SIGQUIT, wait (blocking, bounded), SIGKILL if need be, reap.
fn stop_now(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    if let Some(pid) = child.id() {
        let _ = send_signal(pid, "QUIT");
    }
    if wait_blocking(child, DROP_PATIENCE) {
        return;
    }
    let _ = child.start_kill();
    // Unreaped after this, tokio's kill_on_drop reaps it later.
    wait_blocking(child, DROP_PATIENCE);
}

/// Polls for the child's exit for up to `patience`; true when it is reaped.
/// Blocking because it runs in `Drop`, where nothing can be awaited.
fn wait_blocking(child: &mut Child, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }
}

/// Resolves once the real clock passes `deadline`, checking between short
/// tokio sleeps: a paused tokio clock makes the sleeps return at once but
/// cannot end the wait early.
async fn real_deadline(deadline: Instant) {
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `signal` (a name such as `INT` or `QUIT`) with kill(1); the crate
/// forbids the unsafe a libc call would need.
fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed ({status})");
    }
    Ok(())
}

/// What one startup packet on the socket got back.
enum Probe {
    /// AuthenticationOk: the server takes sessions.
    Ready,
    /// No socket yet, no listener yet, or "the database system is starting up".
    NotYet(String),
    /// An error that waiting will not fix.
    Refused(String),
}

/// Connects to the socket and sends a StartupMessage (protocol 3.0) for the
/// superuser and the `postgres` database, reads the first reply, says
/// goodbye. Plain `try_read`/`try_write`, so tokio's `io-util` is not needed.
async fn probe(socket: &Path) -> Probe {
    match probe_once(socket).await {
        Ok(probe) => probe,
        Err(error) => Probe::NotYet(error.to_string()),
    }
}

async fn probe_once(socket: &Path) -> io::Result<Probe> {
    let stream = UnixStream::connect(socket).await?;
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
    for (name, value) in [("user", SUPERUSER), ("database", "postgres")] {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let length = u32::try_from(body.len() + 4).expect("a short startup packet");
    let mut packet = length.to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    write_all(&stream, &packet).await?;

    let mut header = [0u8; 5];
    read_exact(&stream, &mut header).await?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let Some(body_length) = (length as usize).checked_sub(4).filter(|n| *n <= 65_536) else {
        return Ok(Probe::Refused(format!("a reply of length {length}")));
    };
    let mut body = vec![0u8; body_length];
    read_exact(&stream, &mut body).await?;
    match header[0] {
        b'R' if body == [0, 0, 0, 0] => {
            // Terminate, so the server logs no "unexpected EOF".
            let _ = write_all(&stream, &[b'X', 0, 0, 0, 4]).await;
            Ok(Probe::Ready)
        }
        b'R' => Ok(Probe::Refused(format!(
            "it asks for authentication ({body:?}) though initdb set trust"
        ))),
        b'E' => {
            let (code, message) = error_fields(&body);
            // 57P03 cannot_connect_now: starting up, shutting down, recovering.
            if code == "57P03" {
                Ok(Probe::NotYet(message))
            } else {
                Ok(Probe::Refused(format!("{code} {message}")))
            }
        }
        other => Ok(Probe::Refused(format!(
            "an unexpected {:?} message",
            char::from(other)
        ))),
    }
}

/// The SQLSTATE (`C`) and message (`M`) of an ErrorResponse body.
fn error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    for field in body.split(|byte| *byte == 0) {
        match field.split_first() {
            Some((b'C', value)) => code = String::from_utf8_lossy(value).into_owned(),
            Some((b'M', value)) => message = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

async fn write_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

async fn read_exact(stream: &UnixStream, buffer: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        stream.readable().await?;
        match stream.try_read(&mut buffer[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// The highest-versioned /usr/lib/postgresql/<version>/bin with both
/// `initdb` and `postgres`.
fn find_binaries() -> anyhow::Result<PathBuf> {
    let missing = || {
        anyhow::anyhow!(
            "no PostgreSQL server found: no {DEBIAN_POSTGRESQL}/<version>/bin with initdb and postgres; \
             install Debian's `postgresql` package (apt-get install postgresql)"
        )
    };
    let entries = std::fs::read_dir(DEBIAN_POSTGRESQL).map_err(|_| missing())?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = version_key(&entry.file_name())?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .ok_or_else(missing)
}

/// "15" → [15], "9.6" → [9, 6]; None for names that are not versions.
fn version_key(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?
        .split('.')
        .map(|part| part.parse().ok())
        .collect()
}

/// The effective uid, from /proc/self/status (`Uid: real effective saved fs`).
fn effective_uid() -> anyhow::Result<u32> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .context("/proc/self/status has no readable Uid line")
}

/// nobody's uid and gid, from /etc/passwd.
fn nobody() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            if fields.next()? != "nobody" {
                return None;
            }
            let _password = fields.next()?;
            Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
        })
        .context(
            "running as root, and initdb/postgres refuse root, but /etc/passwd has no user nobody to run them as",
        )
}

/// Drops the `PG*` variables libpq and the server read (PGHOST, PGPORT,
/// PGDATA, PGOPTIONS, PGSERVICE, ...) so the caller's environment cannot
/// steer a private server or its clients elsewhere.
fn remove_libpq_environment(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.as_bytes().starts_with(b"PG") {
            command.env_remove(name);
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters and `keep`.
fn percent_encode(bytes: &[u8], keep: &[u8]) -> String {
    let mut encoded = String::with_capacity(bytes.len());
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) || keep.contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// `name` as a double-quoted SQL identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_the_socket_directory_and_the_database() {
        assert_eq!(
            percent_encode(b"/tmp/postgres-a b+c", b"/"),
            "/tmp/postgres-a%20b%2Bc"
        );
        assert_eq!(percent_encode(b"db/1", b""), "db%2F1");
    }

    #[test]
    fn versions_sort_numerically() {
        assert!(version_key(OsStr::new("15")) > version_key(OsStr::new("9.6")));
        assert_eq!(version_key(OsStr::new("common")), None);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier(r#"a"b"#), r#""a""b""#);
    }

    #[test]
    fn error_responses_give_their_code_and_message() {
        let body = b"SFATAL\0C57P03\0Mthe database system is starting up\0\0";
        assert_eq!(
            error_fields(body),
            ("57P03".into(), "the database system is starting up".into())
        );
    }
}
