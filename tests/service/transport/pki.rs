//! Certificates made at test time: one CA for the server's certificates,
//! another for clients', each written as PEM into a temporary directory.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use authbroker::config::{HealthcheckTls, TlsSettings};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SerialNumber,
};
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        crypto::ring,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The name the server's certificates are for.
pub const SERVER_NAME: &str = "localhost";

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// (certificate PEM, key PEM) with subject CN `cn`.
    pub fn issue(
        &self,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        serial: u64,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A server CA, a client CA and the files `[server.tls]` names.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub server_ca: Ca,
    pub client_ca: Ca,
}

impl Pki {
    /// Writes the CAs and a server certificate with serial 1.
    pub fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            server_ca: Ca::new("authbroker test server CA"),
            client_ca: Ca::new("authbroker test client CA"),
        };
        std::fs::write(pki.path("server-ca.crt"), pki.server_ca.pem()).unwrap();
        std::fs::write(pki.path("client-ca.crt"), pki.client_ca.pem()).unwrap();
        pki.write_server_cert(1);
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new key and certificate (for `localhost` and 127.0.0.1) with this
    /// serial, in place of the old: key first, then certificate.
    pub fn write_server_cert(&self, serial: u64) {
        let (cert, key) = self.server_ca.issue(
            "authbroker",
            &[SERVER_NAME, "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            serial,
        );
        std::fs::write(self.path("server.key"), key).unwrap();
        std::fs::write(self.path("server.crt"), cert).unwrap();
    }

    /// A client certificate from the client CA, as a tonic identity.
    pub fn client_identity(&self, cn: &str) -> Identity {
        let (cert, key) = self
            .client_ca
            .issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth, 7);
        Identity::from_pem(cert, key)
    }

    /// Writes a client certificate and key from the client CA; returns
    /// their paths.
    pub fn write_client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self
            .client_ca
            .issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth, 8);
        let (cert_path, key_path) = (
            self.path(&format!("{cn}.crt")),
            self.path(&format!("{cn}.key")),
        );
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        (cert_path, key_path)
    }

    /// `[server.tls]`, with mTLS when `mtls`.
    pub fn settings(&self, mtls: bool) -> TlsSettings {
        TlsSettings {
            cert_file: self.path("server.crt"),
            key_file: self.path("server.key"),
            client_ca_file: mtls.then(|| self.path("client-ca.crt")),
            healthcheck: HealthcheckTls::default(),
        }
    }

    /// A TLS channel to `addr` that trusts the server CA, presenting
    /// `identity` if given.
    pub async fn channel(
        &self,
        addr: SocketAddr,
        identity: Option<Identity>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.server_ca.pem()))
            .domain_name(SERVER_NAME);
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }

    /// The serial number of the certificate a new TLS connection to
    /// `addr` is shown.
    pub async fn served_serial(&self, addr: SocketAddr) -> String {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.server_ca.pem().as_bytes()).unwrap())
            .unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
            .await
            .unwrap();
        let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
        cert.tbs_certificate.serial.to_string()
    }
}
