//! TLS for the gRPC listener, from the PEM files `[server.tls]` names: the
//! rustls server configuration (certificate, key, and for mTLS the CA that
//! client certificates must chain to), rebuilt when a file changes so a
//! renewed certificate is served without a restart; what a client
//! certificate tells about its holder; and the client side that
//! `authbroker healthcheck` uses.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use tokio_rustls::rustls::{
    self, RootCertStore, ServerConfig,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use x509_parser::{extensions::GeneralName, prelude::parse_x509_certificate};

use crate::config::TlsSettings;

/// How often, at most, the files are looked at again: when a connection is
/// accepted and this long has passed since the last look.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The server's TLS configuration, kept in step with its files.
pub struct ServerTls {
    files: Files,
    state: Mutex<Loaded>,
}

/// The `[server.tls]` files a server configuration is built from.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// Each file's modification time and length (`None`: cannot be read).
type Stamps = Vec<Option<(SystemTime, u64)>>;

struct Loaded {
    config: Arc<ServerConfig>,
    /// The files' stamps when `config` was built from them.
    stamps: Stamps,
    checked: Instant,
    /// Stamps of files that did not make a configuration, so one bad
    /// rotation is logged once rather than every `RELOAD_CHECK`.
    refused: Option<Stamps>,
}

impl ServerTls {
    /// Reads the files; any problem fails the start.
    pub fn load(settings: &TlsSettings) -> anyhow::Result<ServerTls> {
        let files = Files {
            cert: settings.cert_file.clone(),
            key: settings.key_file.clone(),
            client_ca: settings.client_ca_file.clone(),
        };
        let stamps = files.stamps();
        let config = files.server_config().map_err(anyhow::Error::msg)?;
        Ok(ServerTls {
            files,
            state: Mutex::new(Loaded {
                config: Arc::new(config),
                stamps,
                checked: Instant::now(),
                refused: None,
            }),
        })
    }

    /// Whether every client must present a certificate (mTLS).
    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration for a connection accepted now. At most every
    /// [`RELOAD_CHECK`] this compares the files' modification times and
    /// lengths with those it was built from and, when one changed, builds a
    /// new configuration; if that fails (a half-written file, a key that
    /// does not match the certificate) the previous one stays in use and
    /// the problem is logged.
    pub fn config(&self) -> Arc<ServerConfig> {
        // A std Mutex: held for three `stat` calls, and after a change for
        // reading three small files; never across an `.await`.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let stamps = self.files.stamps();
            if stamps != state.stamps && state.refused.as_ref() != Some(&stamps) {
                match self.files.server_config() {
                    Ok(config) => {
                        tracing::info!(cert_file = %self.files.cert.display(), "TLS files changed; new connections get the new certificate");
                        state.config = Arc::new(config);
                        state.stamps = stamps;
                        state.refused = None;
                    }
                    Err(problem) => {
                        tracing::error!(%problem, "TLS files changed but cannot be used; still serving the previous certificate");
                        state.refused = Some(stamps);
                    }
                }
            }
        }
        state.config.clone()
    }
}

impl Files {
    fn stamps(&self) -> Stamps {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|path| {
                let meta = fs::metadata(path).ok()?;
                Some((meta.modified().ok()?, meta.len()))
            })
            .collect()
    }

    fn server_config(&self) -> Result<ServerConfig, String> {
        let certs = read_certs("server.tls.cert_file", &self.cert)?;
        let key = read_key("server.tls.key_file", &self.key)?;
        let roots = match &self.client_ca {
            Some(path) => Some(read_roots("server.tls.client_ca_file", path)?),
            None => None,
        };
        server_config(certs, key, roots)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<RootCertStore>,
) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("server.tls: {e}"))?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("server.tls.client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "server.tls.key_file: is not the key of the certificate in server.tls.cert_file"
                .to_string()
        }
        e => format!("server.tls.cert_file / key_file: {e}"),
    })?;
    // gRPC is HTTP/2 only, and clients such as grpc-go insist on ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "{key}: cannot read certificates from {}: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// The error never quotes the file: it holds a private key.
fn read_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        let why = match e {
            rustls::pki_types::pem::Error::Io(e) => e.to_string(),
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key in it".into(),
            _ => "not a PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
        };
        format!("{key}: cannot read {}: {why}", path.display())
    })
}

fn read_roots(key: &str, path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(key, path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{key}: {} is not a usable CA: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Every problem with `[server.tls]`'s files, for `check-config`.
pub fn check(tls: &TlsSettings) -> Vec<String> {
    let mut problems = Vec::new();
    let certs = read_certs("server.tls.cert_file", &tls.cert_file)
        .map_err(|p| problems.push(p))
        .ok();
    let key = read_key("server.tls.key_file", &tls.key_file)
        .map_err(|p| problems.push(p))
        .ok();
    let roots = match &tls.client_ca_file {
        Some(path) => match read_roots("server.tls.client_ca_file", path) {
            Ok(roots) => Some(Some(roots)),
            Err(p) => {
                problems.push(p);
                None
            }
        },
        None => Some(None),
    };
    if let (Some(certs), Some(key), Some(roots)) = (certs, key, roots)
        && let Err(p) = server_config(certs, key, roots)
    {
        problems.push(p);
    }
    let hc = &tls.healthcheck;
    if let Some(path) = &hc.ca_file
        && let Err(p) = read_certs("server.tls.healthcheck.ca_file", path)
    {
        problems.push(p);
    }
    if let Some(name) = &hc.server_name
        && ServerName::try_from(name.as_str()).is_err()
    {
        problems.push(format!(
            "server.tls.healthcheck.server_name: {name:?} is not a DNS name or IP address"
        ));
    }
    match (&hc.cert_file, &hc.key_file) {
        (Some(cert), Some(key)) => {
            if let Err(p) = read_certs("server.tls.healthcheck.cert_file", cert) {
                problems.push(p);
            }
            if let Err(p) = read_key("server.tls.healthcheck.key_file", key) {
                problems.push(p);
            }
        }
        (None, None) => {}
        _ => {
            problems.push("server.tls.healthcheck: cert_file and key_file go together".to_string())
        }
    }
    problems
}

/// The subject common name of a client's certificate, which
/// `[[auth.client_certs]]` maps to a caller.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    Some(cn.as_str().ok()?.to_owned())
}

/// The name a certificate is for: its first DNS name (a wildcard's
/// `*.example.com` as `healthcheck.example.com`), else its first IP address.
fn named_in(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = parse_x509_certificate(cert.as_ref()).ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .clone();
    let dns = names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => Some(match d.strip_prefix("*.") {
            Some(parent) => format!("healthcheck.{parent}"),
            None => d.to_string(),
        }),
        _ => None,
    });
    dns.or_else(|| {
        names.iter().find_map(|n| match n {
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
    })
}

/// How `authbroker healthcheck` reaches a TLS listener: it trusts
/// `healthcheck.ca_file` (default: `cert_file` itself), verifies the name
/// `healthcheck.server_name` (default: the first name in `cert_file`), and
/// presents `healthcheck.cert_file` when mTLS asks for a certificate.
pub fn healthcheck_client(tls: &TlsSettings) -> anyhow::Result<ClientTlsConfig> {
    let hc = &tls.healthcheck;
    let (ca_key, ca_path) = match &hc.ca_file {
        Some(path) => ("server.tls.healthcheck.ca_file", path),
        None => ("server.tls.cert_file", &tls.cert_file),
    };
    let read = |key: &str, path: &Path| {
        fs::read(path).map_err(|e| anyhow::anyhow!("{key}: cannot read {}: {e}", path.display()))
    };
    // Parsed here for a clear message; tonic takes the file as it is.
    read_certs(ca_key, ca_path).map_err(anyhow::Error::msg)?;
    let ca = Certificate::from_pem(read(ca_key, ca_path)?);
    let name = match &hc.server_name {
        Some(name) => name.clone(),
        None => read_certs("server.tls.cert_file", &tls.cert_file)
            .ok()
            .and_then(|certs| named_in(certs.first()?))
            .unwrap_or_else(|| "localhost".into()),
    };
    let mut config = ClientTlsConfig::new().ca_certificate(ca).domain_name(name);
    match (&hc.cert_file, &hc.key_file) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(
                read("server.tls.healthcheck.cert_file", cert)?,
                read("server.tls.healthcheck.key_file", key)?,
            ));
        }
        (None, None) => {}
        _ => anyhow::bail!("server.tls.healthcheck: cert_file and key_file go together"),
    }
    Ok(config)
}
