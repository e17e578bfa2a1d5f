//! How gRPC bytes travel: the listener (TCP, or a Unix socket with chosen
//! permissions), the server's TLS (optionally mutual), and the client side of
//! both for the CLI and tests.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

use crate::config::{ListenAddress, TlsConfig, UnixSocketMode};

/// A bound listener, ready to serve.
pub enum Listener {
    Tcp(TcpListener),
    /// The socket and its path, removed again when the server stops.
    Unix(UnixListener, PathBuf),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Self::Tcp(listener)
    }
}

impl Listener {
    /// Binds `address`. A Unix socket gets `mode`; a stale socket file left
    /// by a crashed run is replaced.
    pub async fn bind(address: &ListenAddress, mode: UnixSocketMode) -> anyhow::Result<Self> {
        match address {
            ListenAddress::Tcp(address) => {
                let listener = TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on {address}"))?;
                Ok(Self::Tcp(listener))
            }
            ListenAddress::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                set_mode(path, mode.bits())?;
                Ok(Self::Unix(listener, path.clone()))
            }
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|_| "a TCP socket".to_owned(), |address| address.to_string()),
            Self::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("{} is in use by a running process", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the permissions of {}", path.display()))
}

/// A `[tls]` file that cannot serve, with the config key that names it.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsFileError {
    pub key: String,
    pub message: String,
}

/// `table` is where the TLS settings sit in the config (`tls`, `webhook.tls`).
fn tls_error(table: &str, name: &str, message: impl Into<String>) -> TlsFileError {
    TlsFileError {
        key: if name.is_empty() {
            table.to_owned()
        } else {
            format!("{table}.{name}")
        },
        message: message.into(),
    }
}

fn read_tls_file(table: &str, name: &str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|error| {
        tls_error(
            table,
            name,
            format!("cannot read {}: {error}", path.display()),
        )
    })
}

/// The server side of `[tls]`, with its files proven: the certificate chain
/// and the key parse, the key matches the certificate, and the client CA (if
/// any) parses. tonic would only find out when the server starts, after
/// systemd already heard READY=1.
pub(crate) fn server_tls(config: &TlsConfig) -> Result<ServerTlsConfig, TlsFileError> {
    let certificate_pem = read_tls_file("tls", "cert_file", &config.cert_file)?;
    let key_pem = read_tls_file("tls", "key_file", &config.key_file)?;
    prove_identity(&certificate_pem, &key_pem, config, "tls")?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(certificate_pem, key_pem));
    if let Some(client_ca) = &config.client_ca_file {
        let client_ca_pem = read_tls_file("tls", "client_ca_file", client_ca)?;
        let roots = parse_certificates(&client_ca_pem, client_ca)
            .map_err(|message| tls_error("tls", "client_ca_file", message))?;
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            store.add(root).map_err(|error| {
                tls_error(
                    "tls",
                    "client_ca_file",
                    format!(
                        "{}: a certificate is not a usable CA: {error}",
                        client_ca.display()
                    ),
                )
            })?;
        }
        tls = tls.client_ca_root(Certificate::from_pem(client_ca_pem));
    }
    Ok(tls)
}

/// The TLS of the webhook listener (`[webhook.tls]`; no client certificates:
/// Douyin presents none), its files proven like `[tls]`'s, for HTTP/1.1.
pub(crate) fn webhook_tls(config: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, TlsFileError> {
    let certificate_pem = read_tls_file("webhook.tls", "cert_file", &config.cert_file)?;
    let key_pem = read_tls_file("webhook.tls", "key_file", &config.key_file)?;
    let mut server_config = prove_identity(&certificate_pem, &key_pem, config, "webhook.tls")?;
    server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
        server_config,
    )))
}

/// Builds the rustls server config of these files (as tonic will for
/// `[tls]`), to see it succeed; `table` names the settings in errors.
fn prove_identity(
    certificate_pem: &[u8],
    key_pem: &[u8],
    config: &TlsConfig,
    table: &str,
) -> Result<rustls::ServerConfig, TlsFileError> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;

    let chain = parse_certificates(certificate_pem, &config.cert_file)
        .map_err(|message| tls_error(table, "cert_file", message))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| {
        tls_error(
            table,
            "key_file",
            format!(
                "{} holds no usable PEM private key: {error}",
                config.key_file.display()
            ),
        )
    })?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| tls_error(table, "", format!("the TLS provider offers no protocol version: {error}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| {
            tls_error(
                table,
                "key_file",
                format!(
                    "{} and {} do not make a TLS identity (does the key belong to the certificate?): {error}",
                    config.cert_file.display(),
                    config.key_file.display()
                ),
            )
        })
}

/// Every certificate in a PEM file; none at all is an error.
fn parse_certificates(
    pem: &[u8],
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{} is not PEM certificates: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certificates)
}

/// How a client reaches the daemon.
#[derive(Debug, Clone, Default)]
pub struct ClientTransport {
    /// Trust this CA (PEM) and speak TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// Present this certificate and key (PEM), for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry (default: the address's host).
    pub domain: Option<String>,
}

/// Connects to `address` (`host:port`, `http(s)://host:port` or `unix:/path`).
/// A daemon that cannot be reached is a `DaemonUnreachable` naming `address`.
pub async fn connect(address: &str, transport: &ClientTransport) -> anyhow::Result<Channel> {
    let unreachable = |error: tonic::transport::Error| {
        anyhow::Error::new(DaemonUnreachable::new(address, transport, &error))
    };
    if let Some(path) = address.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        // The URI is required by the API but unused: the connector dials the socket.
        let endpoint = Endpoint::try_from("http://localhost")?;
        return endpoint
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
            .await
            .map_err(unreachable);
    }
    let scheme = if transport.ca_pem.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("{scheme}://{address}")
    };
    let mut endpoint = Endpoint::from_shared(uri).with_context(|| {
        format!("{address} is not a daemon address (host:port, https://host:port or unix:/path)")
    })?;
    if let Some(ca) = &transport.ca_pem {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(domain) = &transport.domain {
            tls = tls.domain_name(domain.clone());
        }
        if let Some((cert, key)) = &transport.identity_pem {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint.connect().await.map_err(unreachable)
}

/// What to try when nothing answers at the address.
const START_OR_POINT_ELSEWHERE: &str =
    "is `douyin-tokend serve` running? set --daemon or DOUYIN_TOKEND_ADDRESS";

/// The daemon could not be reached or spoken to: nothing listening, no such
/// socket, a name that does not resolve, TLS on one side only, a certificate
/// not trusted, no answer in time. Its message is one sentence an operator
/// can act on: the address, what went wrong, what to try. The cause chain
/// stays out (it is not this error's `source`): tonic's and hyper's layers
/// each repeat it ("transport error: tcp connect error: tcp connect error:
/// Connection refused (os error 111)") and name library internals. The CLI
/// exits with sysexits' EX_UNAVAILABLE for it.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the daemon at {address}: {reason} ({advice})")]
pub struct DaemonUnreachable {
    address: String,
    reason: String,
    advice: String,
}

impl DaemonUnreachable {
    /// Names what in `failure`'s cause chain (a connect error, or the source
    /// of a status tonic made when the connection broke) kept `address`
    /// from answering, with advice that fits how `transport` spoke to it.
    pub fn new(
        address: &str,
        transport: &ClientTransport,
        failure: &(dyn std::error::Error + 'static),
    ) -> Self {
        let (reason, advice) = describe_connection_failure(address, transport, failure);
        Self {
            address: address.to_owned(),
            reason,
            advice,
        }
    }

    /// The daemon at `address` gave no answer within `timeout`.
    pub fn silent(address: &str, timeout: std::time::Duration) -> Self {
        Self {
            address: address.to_owned(),
            reason: format!("no answer within {}", humantime::format_duration(timeout)),
            advice: START_OR_POINT_ELSEWHERE.to_owned(),
        }
    }
}

/// The reason and the advice of a `DaemonUnreachable`, from the first thing
/// in the cause chain that says what happened: a TLS error, else an I/O
/// error, else a connection that closed before the daemon answered.
fn describe_connection_failure(
    address: &str,
    transport: &ClientTransport,
    failure: &(dyn std::error::Error + 'static),
) -> (String, String) {
    let speaks_tls = transport.ca_pem.is_some() || address.starts_with("https://");
    let mut io_failure: Option<&std::io::Error> = None;
    let mut cause = Some(failure);
    while let Some(error) = cause {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return describe_tls_failure(tls, transport);
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            // An I/O error's `source` skips the error it wraps, which is
            // where rustls puts its own.
            let wrapped_tls = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            if let Some(tls) = wrapped_tls {
                return describe_tls_failure(tls, transport);
            }
            io_failure = io_failure.or(Some(io));
        }
        cause = error.source();
    }
    use std::io::ErrorKind;
    match io_failure.map(|io| (io.kind(), io)) {
        Some((ErrorKind::ConnectionRefused, _)) => (
            "connection refused".to_owned(),
            START_OR_POINT_ELSEWHERE.to_owned(),
        ),
        Some((ErrorKind::NotFound, _)) if address.starts_with("unix:") => (
            "no such socket".to_owned(),
            START_OR_POINT_ELSEWHERE.to_owned(),
        ),
        Some((ErrorKind::PermissionDenied, _)) => (
            "permission denied".to_owned(),
            "run as a user that the socket's unix_socket_mode lets in".to_owned(),
        ),
        // rustls errors that reached here as text (some layers turn them
        // into strings): a TLS failure all the same.
        Some((ErrorKind::InvalidData, io)) if speaks_tls => {
            (plain_io_text(io), tls_advice(transport))
        }
        Some((
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof,
            _,
        ))
        | None => (
            "the connection closed before the daemon answered".to_owned(),
            mismatch_advice(speaks_tls, transport),
        ),
        Some((_, io)) => (plain_io_text(io), START_OR_POINT_ELSEWHERE.to_owned()),
    }
}

/// A rustls error as a reason, with what to check.
fn describe_tls_failure(tls: &rustls::Error, transport: &ClientTransport) -> (String, String) {
    match tls {
        rustls::Error::InvalidCertificate(_) => (
            tls.to_string(),
            "does --tls-ca-file hold the CA that signed the daemon's certificate, and does the \
             certificate carry the address's host or --tls-domain?"
                .to_owned(),
        ),
        rustls::Error::InvalidMessage(_) => (
            "it does not speak TLS".to_owned(),
            "drop --tls-ca-file if the daemon has no [tls]; else check --daemon or \
             DOUYIN_TOKEND_ADDRESS"
                .to_owned(),
        ),
        _ => (tls.to_string(), tls_advice(transport)),
    }
}

/// What to check after a TLS failure the error does not pin down.
fn tls_advice(transport: &ClientTransport) -> String {
    if transport.identity_pem.is_some() {
        "is --tls-cert-file signed by the CA in the daemon's client_ca_file? check \
         --tls-ca-file and --tls-domain too"
            .to_owned()
    } else {
        "if the daemon asks for client certificates, give --tls-cert-file \
         and --tls-key-file; check --tls-ca-file and --tls-domain too"
            .to_owned()
    }
}

/// What to check when the daemon hung up without saying why, which is how a
/// TLS listener answers plaintext and how mutual TLS refuses a client
/// without a certificate.
fn mismatch_advice(speaks_tls: bool, transport: &ClientTransport) -> String {
    if speaks_tls {
        tls_advice(transport)
    } else {
        "if the daemon has [tls], give --tls-ca-file; else check --daemon or \
         DOUYIN_TOKEND_ADDRESS"
            .to_owned()
    }
}

/// An I/O error's text without the "(os error 111)" an operator cannot use.
fn plain_io_text(io: &std::io::Error) -> String {
    let text = io.to_string();
    match text.rfind(" (os error ") {
        Some(start) if text.ends_with(')') => text[..start].to_owned(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(address: &str, transport: &ClientTransport, failure: std::io::Error) -> String {
        DaemonUnreachable::new(address, transport, &failure).to_string()
    }

    #[test]
    fn a_refused_connection_names_the_address_and_what_to_try() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            message("127.0.0.1:50051", &ClientTransport::default(), refused),
            "cannot reach the daemon at 127.0.0.1:50051: connection refused \
             (is `douyin-tokend serve` running? set --daemon or DOUYIN_TOKEND_ADDRESS)"
        );
    }

    #[test]
    fn a_missing_socket_file_is_said_as_such() {
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = message("unix:/run/x.sock", &ClientTransport::default(), missing);
        assert!(
            text.starts_with("cannot reach the daemon at unix:/run/x.sock: no such socket ("),
            "{text}"
        );
    }

    #[test]
    fn an_untrusted_certificate_points_at_the_ca_and_the_domain() {
        let untrusted = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let transport = ClientTransport {
            ca_pem: Some(Vec::new()),
            ..ClientTransport::default()
        };
        let text = message("127.0.0.1:50051", &transport, untrusted);
        assert!(text.contains("UnknownIssuer"), "{text}");
        assert!(
            text.contains("--tls-ca-file") && text.contains("--tls-domain"),
            "{text}"
        );
    }

    #[test]
    fn a_daemon_that_hangs_up_on_plaintext_suggests_tls() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let text = message("127.0.0.1:50051", &ClientTransport::default(), reset);
        assert!(
            text.contains("the connection closed before the daemon answered"),
            "{text}"
        );
        assert!(text.contains("give --tls-ca-file"), "{text}");
    }

    #[test]
    fn os_error_numbers_stay_out_of_the_reason() {
        let error = std::io::Error::from_raw_os_error(113);
        let text = message("10.0.0.1:50051", &ClientTransport::default(), error);
        assert!(!text.contains("os error"), "{text}");
    }
}
