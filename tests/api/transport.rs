//! Transport security: TLS, mutual TLS that refuses a client without a
//! certificate, and the Unix socket listener with its permissions.

use douyin_tokend::app::App;
use douyin_tokend::clock::{ManualClock, SharedClock};
use douyin_tokend::config::{ListenAddress, TlsConfig};
use douyin_tokend::proto::tokend::v1::ListAppsRequest;
use douyin_tokend::proto::tokend::v1::admin_service_client::AdminServiceClient;
use douyin_tokend::transport::{ClientTransport, Listener, connect};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{ADMIN_API_KEY, START_UNIX_MS, TestApp};

/// A throwaway CA with a server certificate for "localhost" and 127.0.0.1,
/// and a client certificate. The webhook's TLS tests use it too.
pub(crate) struct TestPki {
    directory: tempfile::TempDir,
    pub(crate) ca_pem: Vec<u8>,
    client_pem: (Vec<u8>, Vec<u8>),
}

impl TestPki {
    pub(crate) fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "douyin-tokend test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let issue = |names: &[&str], usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
            // rcgen makes "127.0.0.1" an IP address name, which https://127.0.0.1 needs.
            let mut params = CertificateParams::new(names.clone()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, &names[0]);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
        };
        let server = issue(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = issue(&["order-service"], ExtendedKeyUsagePurpose::ClientAuth);
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(directory.path().join("server.pem"), &server.0).unwrap();
        std::fs::write(directory.path().join("server.key"), &server.1).unwrap();
        Self {
            directory,
            ca_pem: ca_cert.pem().into_bytes(),
            client_pem: client,
        }
    }

    pub(crate) fn server_tls(&self, mutual: bool) -> TlsConfig {
        TlsConfig {
            cert_file: self.directory.path().join("server.pem"),
            key_file: self.directory.path().join("server.key"),
            client_ca_file: mutual.then(|| self.directory.path().join("ca.pem")),
        }
    }

    fn client(&self, with_certificate: bool) -> ClientTransport {
        ClientTransport {
            ca_pem: Some(self.ca_pem.clone()),
            identity_pem: with_certificate.then(|| self.client_pem.clone()),
            domain: Some("localhost".to_owned()),
        }
    }
}

async fn list_apps_over(channel: tonic::transport::Channel) -> Result<usize, tonic::Status> {
    let mut admin = AdminServiceClient::with_interceptor(
        channel,
        douyin_tokend::cli::BearerAuth::new(ADMIN_API_KEY).unwrap(),
    );
    Ok(admin
        .list_apps(ListAppsRequest {})
        .await?
        .into_inner()
        .apps
        .len())
}

#[tokio::test]
async fn tls_connections_work_and_plaintext_ones_do_not() {
    let pki = TestPki::new();
    let tls = pki.server_tls(false);
    let app = TestApp::spawn_with(|config, _| config.tls = Some(tls)).await;

    let channel = connect(&app.address.to_string(), &pki.client(false))
        .await
        .unwrap();
    assert_eq!(list_apps_over(channel).await.unwrap(), 0);

    let plaintext = async {
        list_apps_over(connect(&app.address.to_string(), &ClientTransport::default()).await?)
            .await
            .map_err(anyhow::Error::from)
    };
    assert!(plaintext.await.is_err(), "a plaintext client is not served");
    app.stop().await;
}

#[tokio::test]
async fn mutual_tls_serves_clients_with_a_certificate_and_refuses_those_without() {
    let pki = TestPki::new();
    let tls = pki.server_tls(true);
    let app = TestApp::spawn_with(|config, _| config.tls = Some(tls)).await;

    let with_certificate = connect(&app.address.to_string(), &pki.client(true))
        .await
        .unwrap();
    assert_eq!(list_apps_over(with_certificate).await.unwrap(), 0);

    let without_certificate = async {
        let channel = connect(&app.address.to_string(), &pki.client(false)).await?;
        let mut health = HealthClient::new(channel);
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(anyhow::Error::from)
    };
    assert!(
        without_certificate.await.is_err(),
        "mutual TLS refuses a client without a certificate"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_unix_socket_listener_serves_with_its_permissions_and_cleans_up() {
    let directory = tempfile::tempdir().unwrap();
    let socket = directory.path().join("grpc.sock");
    let mut config = douyin_tokend::config::Config {
        database: douyin_tokend::config::DatabaseSetting::Sqlite(
            directory.path().join("tokend.db"),
        ),
        listen: ListenAddress::Unix(socket.clone()),
        ..douyin_tokend::config::Config::default()
    };
    config.refresh.sweep = None;
    config
        .clients
        .push(douyin_tokend::config::ClientEntry::with_every_scope(
            "admin",
            ADMIN_API_KEY,
        ));
    let clock: SharedClock = ManualClock::starting_at(START_UNIX_MS);
    let app = App::start(config.clone(), clock).await.unwrap();
    let listener = Listener::bind(&config.listen, config.unix_socket_mode)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let serving = app.clone();
    let stopped = stop.clone().cancelled_owned();
    let server = tokio::spawn(async move { serving.serve(listener, stopped).await });

    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let channel = connect(
        &format!("unix:{}", socket.display()),
        &ClientTransport::default(),
    )
    .await
    .unwrap();
    assert_eq!(list_apps_over(channel).await.unwrap(), 0);

    stop.cancel();
    server.await.unwrap().unwrap();
    app.close().await;
    assert!(
        !socket.exists(),
        "the socket is removed when the server stops"
    );
}

/// Runs `serve` with `[tls]` pointing at these files and a notify socket;
/// returns the exit code, what systemd heard and the daemon's stderr.
async fn serve_with_tls_files(
    directory: &std::path::Path,
    tls_table: &str,
) -> (Option<i32>, Vec<String>, String) {
    serve_once(directory, "127.0.0.1:0", tls_table).await
}

/// Runs `serve` on `listen` with `rest` of the config and a notify socket;
/// returns the exit code, what systemd heard and the daemon's stderr.
async fn serve_once(
    directory: &std::path::Path,
    listen: &str,
    rest: &str,
) -> (Option<i32>, Vec<String>, String) {
    let config_path = directory.join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "listen = \"{listen}\"\ndatabase = \"{}\"\n{rest}\n",
            directory.join("tokend.db").display()
        ),
    )
    .unwrap();
    let notify_path = directory.join("notify");
    let notify_socket = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let output = tokio::time::timeout(
        crate::daemon_process::PATIENCE,
        tokio::process::Command::new(crate::daemon_process::BINARY)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("DOUYIN_TOKEND_LISTEN")
            .env_remove("DOUYIN_TOKEND_DATABASE")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("serve ends by itself")
    .unwrap();
    let mut heard = Vec::new();
    let mut buffer = vec![0; 4096];
    while let Ok(length) = notify_socket.try_recv(&mut buffer) {
        heard.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
    }
    (
        output.status.code(),
        heard,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn unusable_tls_files_stop_serve_with_exit_64_before_ready_and_before_the_database() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let directory = pki.directory.path();
    std::fs::write(
        directory.join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(directory.join("empty.pem"), "no PEM here\n").unwrap();
    std::fs::copy(
        other.directory.path().join("server.key"),
        directory.join("other.key"),
    )
    .unwrap();
    let table = |cert: &str, key: &str, client_ca: Option<&str>| {
        let mut table = format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            directory.join(cert).display(),
            directory.join(key).display()
        );
        if let Some(client_ca) = client_ca {
            table.push_str(&format!(
                "client_ca_file = \"{}\"\n",
                directory.join(client_ca).display()
            ));
        }
        table
    };
    for (tls_table, expected) in [
        (
            table("garbage.pem", "server.key", None),
            "garbage.pem is not PEM certificates",
        ),
        (
            table("empty.pem", "server.key", None),
            "empty.pem holds no PEM certificate",
        ),
        (
            table("server.pem", "empty.pem", None),
            "no usable PEM private key",
        ),
        (
            table("server.pem", "other.key", None),
            "does the key belong to the certificate?",
        ),
        (
            table("server.pem", "server.key", Some("empty.pem")),
            "empty.pem holds no PEM certificate",
        ),
    ] {
        let run = tempfile::tempdir().unwrap();
        let (code, heard, stderr) = serve_with_tls_files(run.path(), &tls_table).await;
        assert_eq!(code, Some(64), "a bad config: {tls_table}\n{stderr}");
        assert!(
            !run.path().join("tokend.db").exists(),
            "nothing is created before the refusal"
        );
        assert!(
            !heard.iter().any(|message| message.contains("READY=1")),
            "{tls_table}: systemd heard {heard:?}"
        );
        assert!(stderr.contains(expected), "{tls_table}: {stderr}");
    }
}

#[tokio::test]
async fn a_port_in_use_stops_serve_before_it_creates_a_database_or_a_master_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let run = tempfile::tempdir().unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let (code, heard, stderr) = serve_once(run.path(), &listen, "").await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert!(heard.iter().all(|message| !message.contains("READY=1")));
    assert!(
        !run.path().join("tokend.db").exists(),
        "a database was created"
    );
    assert!(
        !run.path().join("master.key").exists(),
        "a master key was created"
    );
}
