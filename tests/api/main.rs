//! Black-box tests of the daemon through its real path: gRPC in, HTTP out to
//! the sandbox Douyin, SQLite underneath. Time is a manual clock shared by the
//! test, the daemon and the sandbox; nothing sleeps. The service tests run the
//! real binary as systemd would (`daemon_process`) on the real clock, and wait
//! on events: notify datagrams, health streams, process exits.

mod daemon_process;
mod helpers;

mod accelerated;
mod access;
mod admin;
mod after_sale;
mod after_sale_list_audit;
mod check_config;
mod cli_output;
mod cluster;
mod demo;
mod failures;
mod health;
mod metrics;
mod postgres_server;
mod request_id;
mod sealing;
mod service_lifecycle;
mod token_lifecycle;
mod traffic;
mod transport;
mod webhook;
