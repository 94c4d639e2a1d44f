//! HTTPS for the emulators: a private CA made at test time ([`TestCa`]), a
//! server certificate it signs ([`ServerCert`]), and [`serve`], the HTTPS
//! twin of `emulators::serve`. Nothing here is trusted by default: a client
//! trusts the CA only through its PEM ([`TestCa::write_pem`], for
//! `http.ca_file`).

use std::{net::SocketAddr, path::Path, path::PathBuf, sync::Arc, time::Duration};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
    server::TlsStream,
};

/// A certificate authority that exists only for one test.
pub struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A server certificate (signed by a [`TestCa`]) and its key.
pub struct ServerCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::new()).expect("no names to check");
        params
            .distinguished_name
            .push(DnType::CommonName, "authbroker test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("the CA certificate");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA certificate as `DIR/ca.pem`; returns the path.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).expect("write the CA certificate");
        path
    }

    /// A server certificate for `names` (host names or IP addresses).
    pub fn server_cert(&self, names: &[&str]) -> ServerCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).expect("valid names");
        let key = KeyPair::generate().expect("a server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("the server certificate");
        ServerCert {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }
}

/// Serves `router` over HTTPS with `cert` on 127.0.0.1:0; returns
/// `https://127.0.0.1:PORT` and the task (abort it on drop).
pub async fn serve(
    router: axum::Router,
    cert: &ServerCert,
) -> (String, tokio::task::JoinHandle<()>) {
    // Named explicitly: with more than one crypto provider compiled in,
    // rustls has no process default.
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(
        cert.chain.clone(),
        PrivateKeyDer::from(cert.key.clone_key()),
    )
    .expect("the server certificate and key match");
    let tcp = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind an emulator");
    let port = tcp.local_addr().expect("emulator address").port();
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(config)),
    };
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("https://127.0.0.1:{port}"), task)
}

/// Accepts TCP connections and completes their handshake. A handshake the
/// client abandons (it did not trust the certificate) is dropped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // One handshake at a time is plenty for a test; the timeout
            // keeps a silent client from stalling the others.
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
