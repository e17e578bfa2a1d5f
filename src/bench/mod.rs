//! The benchmark and soak harness shared by `douyin-bench` (src/bin) and the
//! soak test (tests/soak.rs): a fleet of apps and merchants taught to the
//! sandbox and stored in the daemon's database, latency and process
//! measurements, and the soak driven by a manual clock. Nothing here is on the
//! daemon's serving path.

pub mod fleet;
pub mod measure;
pub mod soak;
