//! The benchmark and soak harness shared by `douyin-bench` (src/bin) and the
//! soak test (tests/api/accelerated.rs): a fleet of apps and merchants taught to the
//! sandbox and stored in the daemon's database, latency and process
//! measurements, the soak driven by a manual clock, and a private PostgreSQL
//! server for tests that need one. Nothing here is on the daemon's serving
//! path.

pub mod daemon_process;
pub mod fleet;
pub mod measure;
pub mod postgres_server;
pub mod soak;

use std::path::{Path, PathBuf};

use crate::access::KeyHash;
use crate::cli::BearerAuth;
use crate::config::ClientEntry;

/// The key the harness calls the daemon with (every scope); only its hash is configured.
pub(crate) const BENCH_API_KEY: &str = "dtk_bench_harness_key_000000000000000000000000000000";

/// The `[[clients]]` entry for [`BENCH_API_KEY`].
pub fn bench_client() -> ClientEntry {
    ClientEntry::with_every_scope("bench", BENCH_API_KEY)
}

/// The same entry as config file text, for a spawned daemon.
pub fn bench_client_toml() -> String {
    format!(
        "[[clients]]\nname = \"bench\"\nkey_sha256 = \"{}\"\nscopes = [\"admin\", \"aftersale.read\", \"aftersale.events\", \"token.read\", \"token.report\"]\n",
        KeyHash::of_key(BENCH_API_KEY).to_hex()
    )
}

/// Stores the [`bench_client`] (every scope) in a database the way
/// AdminService would, for daemons whose config file declares no clients
/// (several daemons on one PostgreSQL database).
pub async fn store_bench_client(
    store: &crate::store::Store,
    now_ms: i64,
) -> Result<(), crate::store::StoreError> {
    let client = bench_client();
    let record = crate::store::ClientRecord {
        name: client.name.clone(),
        key_sha256: client.key_sha256.to_hex(),
        scopes: client
            .scopes
            .iter()
            .map(|scope| scope.as_str().to_owned())
            .collect(),
        apps: None,
        merchants: None,
        source: crate::store::Source::Admin,
    };
    store.clients().create(&record, now_ms).await.map(drop)
}

/// Sends [`BENCH_API_KEY`] with every call.
pub fn bench_auth() -> BearerAuth {
    BearerAuth::new(BENCH_API_KEY).expect("the bench key is a valid header")
}

/// Where the daemon looks for a database's master key by default.
pub fn master_key_beside(database: &Path) -> PathBuf {
    database
        .parent()
        .map_or_else(PathBuf::new, Path::to_path_buf)
        .join("master.key")
}
