//! TLS to Postgres, as the URL's `sslmode` and `sslrootcert` ask, with
//! libpq's meanings:
//!
//! | `sslmode`          | TLS                          | the server's certificate                   |
//! |--------------------|------------------------------|--------------------------------------------|
//! | `disable`          | never                        | —                                          |
//! | `prefer` (default) | if the server offers it      | not checked; with `sslrootcert`, as `verify-ca` |
//! | `require`          | always                       | not checked; with `sslrootcert`, as `verify-ca` |
//! | `verify-ca`        | always                       | chains to a CA in `sslrootcert`            |
//! | `verify-full`      | always                       | that, and names the host of the URL        |
//!
//! tokio-postgres knows only the first three modes and no `sslrootcert`, so
//! [`parse_url`] takes both parameters out of the URL, hands the rest to
//! `tokio_postgres::Config`, and builds [`MakeTls`], the rustls connector
//! every pooled connection (the user store's and the Postgres state
//! backend's) is made with. Unlike libpq we never read
//! `~/.postgresql/root.crt` or the `PG*` environment: what is checked is in
//! the URL. `sslrootcert` is read once, when the pool is built.
//!
//! Without a CA the handshake still proves the server holds the key of the
//! certificate it shows, and that certificate's hash is offered for SCRAM
//! channel binding (`tls-server-end-point`): with `channel_binding=require`
//! in the URL (read by tokio-postgres), a password login through a machine
//! in the middle fails even over unverified TLS.

use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, ring, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::ParsedCertificate;
use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// The URL's `sslmode`, with libpq's names and meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries without TLS first: a downgrade we do not offer.
            other => {
                return Err(format!(
                    "sslmode={other:?} is not one of disable, prefer, require, verify-ca, \
                     verify-full"
                ));
            }
        })
    }
}

impl SslMode {
    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether TLS is skipped, tried or required.
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// Why a Postgres URL cannot be used. Names the problem, never the URL,
/// which may hold a password.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UrlError(String);

/// Splits a `postgres://` URL into the configuration tokio-postgres reads
/// and the connector for its `sslmode` and `sslrootcert`, reading the CA
/// file.
pub(crate) fn parse_url(url: &str) -> Result<(tokio_postgres::Config, MakeTls), UrlError> {
    split_url(url).map_err(UrlError)
}

fn split_url(url: &str) -> Result<(tokio_postgres::Config, MakeTls), String> {
    let (rest, params) = take_tls_params(url)?;
    // tokio-postgres says "invalid connection string"; its source says why.
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| match e.source() {
        Some(why) => format!("{e}: {why}"),
        None => e.to_string(),
    })?;
    let mode = match &params.mode {
        Some(mode) => mode.parse()?,
        None => SslMode::Prefer,
    };
    config.ssl_mode(mode.negotiation());
    let roots = match (&params.root_cert, mode) {
        (_, SslMode::Disable) => None,
        (Some(path), _) => Some(read_roots(Path::new(path))?),
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(format!(
                "sslmode={} needs sslrootcert=PATH, the PEM file of the CA that signed the \
                 server's certificate",
                mode.as_str()
            ));
        }
        (None, _) => None,
    };
    let checks = Checks {
        mode,
        root_cert: params.root_cert.map(PathBuf::from),
    };
    Ok((config, MakeTls::new(checks, roots)?))
}

/// The TLS parameters taken out of a URL.
#[derive(Debug, Default, PartialEq)]
struct TlsParams {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// The URL without `sslmode` and `sslrootcert`, and their values (decoded).
/// Splits as tokio-postgres does: the query begins at the first `?` after
/// the credentials, and every other parameter is kept exactly as written.
fn take_tls_params(url: &str) -> Result<(String, TlsParams), String> {
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let Some(query_at) = url[after_credentials..]
        .find('?')
        .map(|q| after_credentials + q)
    else {
        return Ok((url.to_owned(), TlsParams::default()));
    };
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    for pair in url[query_at + 1..].split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match decode(key)?.as_ref() {
            "sslmode" => &mut params.mode,
            "sslrootcert" => &mut params.root_cert,
            _ => {
                kept.push(pair);
                continue;
            }
        };
        // As in tokio-postgres, the last of a repeated parameter wins.
        *slot = Some(decode(value)?.into_owned());
    }
    let mut rest = url[..query_at].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, params))
}

fn decode(s: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map_err(|e| format!("invalid connection string: {e}"))
}

/// The CAs of `sslrootcert`: at least one, or an error naming the file.
fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let at = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslrootcert: cannot read certificates from {at}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("sslrootcert: {at} holds no PEM certificate"));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| {
            format!("sslrootcert: {at} holds a certificate that is not a usable CA: {e}")
        })?;
    }
    Ok(roots)
}

/// What a connection's certificate is checked against, for error messages.
#[derive(Debug)]
struct Checks {
    mode: SslMode,
    root_cert: Option<PathBuf>,
}

/// The connector given to the pool: one rustls configuration, shared by
/// every connection.
#[derive(Clone)]
pub(crate) struct MakeTls {
    connector: TlsConnector,
    checks: Arc<Checks>,
    /// Count each flight of messages to the server (`counting_round_trips`).
    count_round_trips: bool,
}

impl MakeTls {
    fn new(checks: Checks, roots: Option<RootCertStore>) -> Result<MakeTls, String> {
        let provider = Arc::new(ring::default_provider());
        let verifier = Arc::new(Verifier {
            check_name: roots.is_some() && checks.mode == SslMode::VerifyFull,
            roots,
            provider: provider.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS to the database: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // What libpq 17 sends; Postgres 17 refuses a client whose ALPN names
        // anything else, older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeTls {
            connector: TlsConnector::from(Arc::new(config)),
            checks: Arc::new(checks),
            count_round_trips: false,
        })
    }

    /// Connections made by this connector count every flight of messages
    /// they send in `store::ROUND_TRIPS` — BEGIN, a statement, a pipelined
    /// batch, COMMIT: each flush of written bytes is one round trip. The
    /// TLS stream is the one place every message passes, so nothing in the
    /// store's SQL has to remember to count. Plain connections
    /// (`sslmode=disable`, or `prefer` to a server without TLS) are not
    /// counted.
    pub(crate) fn counting_round_trips(mut self) -> Self {
        self.count_round_trips = true;
        self
    }
}

impl fmt::Debug for MakeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeTls")
            .field("checks", &self.checks)
            .finish()
    }
}

impl MakeTlsConnect<Socket> for MakeTls {
    type Stream = TlsStream;
    type TlsConnect = Connect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, TlsError> {
        let name =
            ServerName::try_from(host.to_owned()).map_err(|_| TlsError::Name(host.to_owned()))?;
        Ok(Connect {
            name,
            connector: self.connector.clone(),
            checks: self.checks.clone(),
            count_round_trips: self.count_round_trips,
        })
    }
}

/// One connection's handshake.
pub(crate) struct Connect {
    name: ServerName<'static>,
    connector: TlsConnector,
    checks: Arc<Checks>,
    count_round_trips: bool,
}

impl TlsConnect<Socket> for Connect {
    type Stream = TlsStream;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream, TlsError>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            match self.connector.connect(self.name, socket).await {
                Ok(stream) => Ok(TlsStream {
                    inner: stream,
                    round_trips: if self.count_round_trips {
                        ::metrics::counter!(crate::store::ROUND_TRIPS)
                    } else {
                        ::metrics::Counter::noop()
                    },
                    written: false,
                }),
                Err(e) => Err(TlsError::from_handshake(e, &self.checks)),
            }
        })
    }
}

/// Why TLS to the database failed. Holds no URL.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("{0:?} is not a host name or IP address a TLS certificate can be checked against")]
    Name(String),
    #[error("the database server's certificate was refused ({checked}): {why}")]
    Certificate { checked: String, why: String },
    #[error("TLS with the database server failed: {0}")]
    Handshake(#[source] io::Error),
}

impl TlsError {
    fn from_handshake(e: io::Error, checks: &Checks) -> TlsError {
        let Some(rustls::Error::InvalidCertificate(problem)) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return TlsError::Handshake(e);
        };
        let root_cert = checks
            .root_cert
            .as_deref()
            .map_or_else(String::new, |p| format!(", sslrootcert {}", p.display()));
        let why = match problem {
            CertificateError::UnknownIssuer => "it is not signed by a CA in sslrootcert".into(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("{problem} (verify-full checks the URL's host; verify-ca does not)")
            }
            other => other.to_string(),
        };
        TlsError::Certificate {
            checked: format!("sslmode={}{root_cert}", checks.mode.as_str()),
            why,
        }
    }
}

/// Checks the server's certificate as the mode asks: with no CA, not at all
/// (the handshake signatures are still verified); with one, the chain; for
/// `verify-full`, also the name.
#[derive(Debug)]
struct Verifier {
    roots: Option<RootCertStore>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
            if self.check_name {
                verify_server_name(&cert, server_name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS connection to the server.
pub(crate) struct TlsStream {
    inner: tokio_rustls::client::TlsStream<Socket>,
    round_trips: ::metrics::Counter,
    /// Bytes were written since the last flush: the next flush sends a
    /// flight.
    written: bool,
}

impl tokio_postgres::tls::TlsStream for TlsStream {
    /// RFC 5929's `tls-server-end-point`: the server certificate's hash,
    /// with the hash of its signature (SHA-1 and MD5 raised to SHA-256).
    /// None for a signature with no single hash (RSA-PSS, Ed25519): SCRAM
    /// then goes without channel binding.
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.inner.get_ref();
        session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| end_point_hash(cert))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

fn end_point_hash(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let der = cert.as_ref();
    Some(
        match parsed.signature_algorithm.algorithm.to_id_string().as_str() {
            // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA256
            "1.2.840.113549.1.1.4"
            | "1.2.840.113549.1.1.5"
            | "1.2.840.113549.1.1.11"
            | "1.2.840.10045.4.1"
            | "1.2.840.10045.4.3.2" => Sha256::digest(der).to_vec(),
            // sha384WithRSA, ecdsa-with-SHA384
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Sha384::digest(der).to_vec(),
            // sha512WithRSA, ecdsa-with-SHA512
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Sha512::digest(der).to_vec(),
            _ => return None,
        },
    )
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.written |= matches!(written, Poll::Ready(Ok(n)) if n > 0);
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if self.written && flushed.is_ready() {
            self.written = false;
            self.round_trips.increment(1);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.written |= matches!(written, Poll::Ready(Ok(n)) if n > 0);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, TlsParams) {
        take_tls_params(url).unwrap()
    }

    #[test]
    fn tls_parameters_are_taken_out_and_the_rest_kept_as_written() {
        let (rest, params) = split(
            "postgres://u:p%3Fw@db.internal:5433/app?sslmode=verify-full&application_name=a%20b\
             &sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db.internal:5433/app?application_name=a%20b&connect_timeout=3"
        );
        assert_eq!(params.mode.as_deref(), Some("verify-full"));
        assert_eq!(params.root_cert.as_deref(), Some("/etc/ca.pem"));

        let (rest, params) = split("postgres://h/db?sslmode=require");
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(params.mode.as_deref(), Some("require"));

        let (rest, params) = split("postgresql://h/db");
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(params, TlsParams::default());
    }

    #[test]
    fn a_question_mark_in_the_password_is_not_the_query() {
        let (rest, params) = split("postgres://u:a?b@h/db?sslmode=disable");
        assert_eq!(rest, "postgres://u:a?b@h/db");
        assert_eq!(params.mode.as_deref(), Some("disable"));
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_negotiates() {
        use tokio_postgres::config::SslMode as Pg;
        for (url, expected) in [
            ("postgres://h/db", Pg::Prefer),
            ("postgres://h/db?sslmode=disable", Pg::Disable),
            ("postgres://h/db?sslmode=prefer", Pg::Prefer),
            ("postgres://h/db?sslmode=require", Pg::Require),
        ] {
            let (config, tls) = parse_url(url).unwrap();
            assert_eq!(config.get_ssl_mode(), expected, "{url}");
            assert!(tls.checks.root_cert.is_none());
        }
    }

    #[test]
    fn bad_values_are_named() {
        let err = split_url("postgres://u:secret@h/db?sslmode=allow").unwrap_err();
        assert!(err.contains("sslmode=\"allow\""), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let err = split_url("postgres://h/db?sslmode=verify-full").unwrap_err();
        assert!(err.contains("needs sslrootcert"), "{err}");
        let err = split_url("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
            .unwrap_err();
        assert!(
            err.contains("sslrootcert: cannot read certificates from /nonexistent/ca.pem"),
            "{err}"
        );
        // Other parameters still reach tokio-postgres, which checks them.
        let err = split_url("postgres://h/db?sslmode=require&sslcert=/x.pem").unwrap_err();
        assert!(err.contains("sslcert"), "{err}");
    }

    #[test]
    fn disable_never_reads_the_ca_file() {
        let (config, _) =
            parse_url("postgres://h/db?sslmode=disable&sslrootcert=/nonexistent/ca.pem").unwrap();
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn channel_binding_hashes_with_the_signature_hash() {
        // rcgen signs with ECDSA P-256 and SHA-256 by default.
        let cert = rcgen::generate_simple_self_signed(vec!["db.test".into()])
            .unwrap()
            .cert;
        let der = cert.der();
        assert_eq!(end_point_hash(der), Some(Sha256::digest(der).to_vec()));
        assert_eq!(end_point_hash(&CertificateDer::from(vec![1, 2, 3])), None);
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = split_url(&format!(
            "postgres://h/db?sslmode=verify-ca&sslrootcert={}",
            path.display()
        ))
        .unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }
}
