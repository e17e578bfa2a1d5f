//! Black-box tests of the daemon through its real path: gRPC in, HTTP out to
//! the sandbox Douyin, SQLite underneath. Time is a manual clock shared by the
//! test, the daemon and the sandbox; nothing sleeps.

mod helpers;

mod access;
mod admin;
mod after_sale;
mod demo;
mod failures;
mod sealing;
mod token_lifecycle;
mod traffic;
mod transport;
