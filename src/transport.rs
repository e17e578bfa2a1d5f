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
pub async fn connect(address: &str, transport: &ClientTransport) -> anyhow::Result<Channel> {
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
            .with_context(|| format!("cannot reach the daemon at {address}; is `douyin-tokend serve` running?"));
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
    let mut endpoint = Endpoint::from_shared(uri.clone())?;
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
    endpoint.connect().await.with_context(|| {
        format!("cannot reach the daemon at {uri}; is `douyin-tokend serve` running?")
    })
}
