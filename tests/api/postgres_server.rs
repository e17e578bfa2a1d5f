//! `PostgresServer`, the private PostgreSQL the PostgreSQL tests run against:
//! databases made with psql, the URL psql connects with, a stop and a start
//! on the same data, and nothing left behind (no process, no directory) once
//! it is dropped.

use std::path::Path;

use douyin_tokend::bench::postgres_server::PostgresServer;
use tokio::net::UnixStream;

#[tokio::test]
async fn a_private_server_makes_databases_survives_a_restart_and_leaves_nothing_behind() {
    let mut server = PostgresServer::start().await.expect("the server starts");
    let socket = server
        .socket_directory()
        .join(format!(".s.PGSQL.{}", server.port()));
    assert_eq!(server.user(), "tokend");

    server.create_database("first").await.unwrap();
    server.create_database("second").await.unwrap();
    let url = server.url("first");
    assert!(
        url.starts_with("postgres:///first?host=/") && url.ends_with("&port=5432&user=tokend"),
        "{url}"
    );
    assert_eq!(server.psql("first", "select 1").await.unwrap(), "1\n");
    assert_eq!(
        server
            .psql(
                "first",
                "select current_database() || ' ' || count(*) from pg_database \
                 where datname in ('first', 'second')"
            )
            .await
            .unwrap(),
        "first 2\n"
    );
    server
        .psql(
            "first",
            "create table kept (n int); insert into kept values (7)",
        )
        .await
        .unwrap();

    server.stop().await.expect("a fast shutdown");
    assert!(server.pid().is_none());
    let refused = UnixStream::connect(&socket).await;
    assert!(refused.is_err(), "the socket still answers after stop");
    assert!(server.psql("first", "select 1").await.is_err());

    server.start_again().await.expect("the server starts again");
    assert_eq!(
        server.psql("first", "select n from kept").await.unwrap(),
        "7\n",
        "the data outlives the restart"
    );

    let logs = server.logs();
    assert!(logs.contains("received fast shutdown request"), "{logs}");
    assert_eq!(
        logs.matches("database system is ready to accept connections")
            .count(),
        2,
        "{logs}"
    );
    // The readiness probe says goodbye instead of hanging up.
    assert!(!logs.contains("unexpected EOF"), "{logs}");

    let postmaster = server.pid().expect("running");
    let helpers = children_of(postmaster);
    assert!(
        !helpers.is_empty(),
        "the postmaster has its checkpointer and friends"
    );
    let directory = server.socket_directory().to_path_buf();
    drop(server);
    for pid in std::iter::once(postmaster).chain(helpers) {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived the server"
        );
    }
    assert!(!directory.exists(), "{} is left", directory.display());
}

/// The pids whose parent is `parent`, from /proc/<pid>/stat.
fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let after_comm = &stat[stat.rfind(')').map_or(0, |end| end + 1)..];
        let ppid = after_comm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}
