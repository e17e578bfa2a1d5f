//! douyin-tokend: the one place in a merchant's stack that owns Douyin
//! open-platform client tokens, and a gRPC front for the after-sale order
//! detail lookup.
//!
//! Crate map (dependencies point down; see ARCHITECTURE.md):
//! - [`app`]: composition root, start and stop order, reloads.
//! - `lifecycle`, [`systemd_notify`]: component supervision; READY, STOPPING, watchdog.
//! - [`metrics`], [`telemetry`]: Prometheus metrics; logs and the RPC span.
//! - [`grpc`]: tonic services and the one failure → `Status` mapping.
//! - [`lookup`]: the after-sale use case (token, upstream, refresh-and-retry once).
//! - [`webhook`], [`after_sale_events`]: Douyin's refund-request notifications,
//!   verified, stored durably, streamed to watchers.
//! - `registry`: apps, merchants and API clients, in SQLite and in memory.
//! - `reload`: configuration reloads (SIGHUP, AdminService.ReloadConfig) told to systemd.
//! - [`token`]: token lifecycle: policy, single-flight fetches, the sweep, the scheduler.
//! - [`store`]: the only SQL.
//! - [`douyin`]: the only code that knows Douyin's URLs, JSON and error codes.
//! - [`sandbox`]: a strict fake Douyin for tests, the demo and benchmarks.
//! - [`bench`]: the benchmark and soak harness (`douyin-bench`, the soak's short form in tests/api/accelerated.rs).
//! - [`config`], [`domain`], [`clock`], `pace`, [`proto`]: shared foundations.
//!
//! Items are `pub` only where the binaries, `tests/` or `benches/` use them;
//! the rest is `pub(crate)`, so the compiler reports what nothing uses.

pub mod access;
pub mod after_sale_events;
pub mod app;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod clock;
pub(crate) mod cluster;
pub mod config;
pub mod demo;
pub mod domain;
pub mod douyin;
pub mod grpc;
pub(crate) mod lifecycle;
pub mod lookup;
pub mod metrics;
pub(crate) mod pace;
pub mod proto;
pub(crate) mod registry;
pub(crate) mod reload;
pub mod sandbox;
pub mod schedule;
pub mod sealing;
pub mod store;
pub mod systemd_notify;
pub mod telemetry;
pub mod token;
pub mod transport;
pub mod webhook;
