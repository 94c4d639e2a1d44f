//! The one outbound HTTP client every provider call goes through: connect and
//! total timeouts, a response-size cap, and no redirects (a token endpoint that
//! redirects is misconfigured or hijacked, never something to follow).
//! Certificates are checked against the bundled Mozilla roots, or the
//! system's (`http.system_roots`), plus `http.ca_file`; a certificate that
//! fails is told apart from an outage ([`TlsFailure`]).

use std::{path::Path, time::Duration};

use reqwest::{Response, StatusCode, header::HeaderMap};

use crate::config::HttpSettings;

#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    max_body: usize,
}

/// A fully read answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Why an outbound call produced no usable answer. Messages never contain
/// URLs with query strings (they may hold codes or tokens).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("timed out")]
    Timeout,
    #[error("could not connect")]
    Connect,
    #[error("transport error")]
    Transport(#[source] reqwest::Error),
    #[error("answer larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The TLS handshake failed: no request was sent.
    #[error("TLS handshake failed: {0}")]
    Tls(TlsFailure),
}

/// Why a provider's HTTPS handshake failed. Retrying does not help: the
/// certificate, or the trust configured for it, has to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    #[error(
        "certificate not trusted (set http.ca_file to its CA, or http.system_roots = true \
         if the system trusts it)"
    )]
    Untrusted,
    #[error("certificate is not valid for this host name")]
    WrongHost,
    #[error("certificate expired or not yet valid")]
    Expired,
    #[error("certificate revoked")]
    Revoked,
    /// Anything else rustls refused (protocol versions, alerts, a server
    /// that does not speak TLS); rustls's own words, which hold no URL.
    #[error("{0}")]
    Other(String),
}

impl From<&rustls::Error> for TlsFailure {
    fn from(e: &rustls::Error) -> Self {
        use rustls::CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer | C::BadSignature => TlsFailure::Untrusted,
                C::NotValidForName | C::NotValidForNameContext { .. } => TlsFailure::WrongHost,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => TlsFailure::Expired,
                C::Revoked => TlsFailure::Revoked,
                other => TlsFailure::Other(format!("invalid peer certificate: {other:?}")),
            },
            other => TlsFailure::Other(other.to_string()),
        }
    }
}

/// Whether a request to `url` would cross a network in clear: `http://` to a
/// host other than loopback (`localhost`, 127.0.0.0/8, `::1`).
pub fn in_clear_off_loopback(url: &url::Url) -> bool {
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    url.scheme() == "http" && !loopback
}

impl HttpClient {
    pub fn new(settings: &HttpSettings) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(settings.user_agent.clone())
            .pool_idle_timeout(Duration::from_secs(60))
            .tls_built_in_webpki_certs(!settings.system_roots)
            .tls_built_in_native_certs(settings.system_roots);
        if let Some(path) = &settings.ca_file {
            for cert in read_ca_file(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        // The whole chain inline: callers print the top message only.
        let client = builder.build().map_err(|e| {
            anyhow::anyhow!(
                "cannot set up the HTTPS client: {}",
                crate::telemetry::cause_chain(&e)
            )
        })?;
        Ok(HttpClient {
            client,
            max_body: settings.max_response_bytes,
        })
    }

    pub fn request(&self, method: reqwest::Method, url: url::Url) -> reqwest::RequestBuilder {
        self.client.request(method, url)
    }

    /// Sends and reads the whole body, refusing bodies over the cap.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<HttpAnswer, HttpError> {
        let mut response = request.send().await.map_err(classify)?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let body = read_capped(response, self.max_body).await?;
        Ok(HttpAnswer {
            status,
            headers,
            body,
        })
    }
}

/// The certificates of `http.ca_file`; at least one, or an error naming the
/// file.
fn read_ca_file(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let at = path.display();
    let pem =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("http.ca_file: cannot read {at}: {e}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| anyhow::anyhow!("http.ca_file: {at} is not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("http.ca_file: {at} holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
    }
    Ok(certs)
}

/// The rustls error somewhere in `e`'s cause chain, if the failure was the
/// TLS handshake.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(TlsFailure::from(tls));
        }
        // `io::Error::source` skips the error it wraps, which is where the
        // connector puts rustls's; step into it instead.
        next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

fn classify(e: reqwest::Error) -> HttpError {
    // reqwest's Display includes the URL, query and all; drop it so a code in
    // a query string can never reach a log line.
    let e = e.without_url();
    if let Some(tls) = tls_failure(&e) {
        HttpError::Tls(tls)
    } else if e.is_timeout() {
        HttpError::Timeout
    } else if e.is_connect() {
        HttpError::Connect
    } else {
        HttpError::Transport(e)
    }
}

/// Reads the body, refusing it as soon as it passes `limit` (the declared
/// length is not trusted: chunked answers have none).
async fn read_capped(mut response: Response, limit: usize) -> Result<Vec<u8>, HttpError> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(HttpError::TooLarge { limit });
    }
    // Sized once when the length is announced (within the cap), rather
    // than grown chunk by chunk.
    let announced = response.content_length().unwrap_or(0).min(limit as u64);
    let mut body = Vec::with_capacity(announced as usize);
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > limit {
            return Err(HttpError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError;

    #[test]
    fn clear_text_is_told_apart_from_loopback() {
        for (url, in_clear) in [
            ("http://idp.example/token?code=x", true),
            ("http://10.0.0.7:8080", true),
            ("http://localhost.example", true),
            ("http://127.0.0.1:9/t", false),
            ("http://127.8.9.10", false),
            ("http://localhost:8080", false),
            ("http://LOCALHOST", false),
            ("http://[::1]:9", false),
            ("https://idp.example", false),
        ] {
            let parsed = url::Url::parse(url).unwrap();
            assert_eq!(in_clear_off_loopback(&parsed), in_clear, "{url}");
        }
    }

    #[test]
    fn certificate_failures_are_named() {
        let cert = |e| TlsFailure::from(&rustls::Error::InvalidCertificate(e));
        assert_eq!(cert(CertificateError::UnknownIssuer), TlsFailure::Untrusted);
        assert_eq!(cert(CertificateError::BadSignature), TlsFailure::Untrusted);
        assert_eq!(
            cert(CertificateError::NotValidForName),
            TlsFailure::WrongHost
        );
        assert_eq!(cert(CertificateError::Expired), TlsFailure::Expired);
        assert_eq!(cert(CertificateError::Revoked), TlsFailure::Revoked);
        assert!(matches!(
            TlsFailure::from(&rustls::Error::HandshakeNotComplete),
            TlsFailure::Other(_)
        ));
        assert!(TlsFailure::Untrusted.to_string().contains("http.ca_file"));
    }

    /// The connector hands rustls's error on inside an `io::Error`, whose
    /// `source()` skips it.
    #[test]
    fn a_tls_failure_is_found_inside_io_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Outer(#[source] std::io::Error);
        let io = std::io::Error::other(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        assert_eq!(tls_failure(&Outer(io)), Some(TlsFailure::Untrusted));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(tls_failure(&Outer(refused)), None);
    }

    #[test]
    fn ca_file_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let problem = |contents: Option<&str>| {
            let path = dir.path().join("ca.pem");
            let _ = std::fs::remove_file(&path);
            if let Some(c) = contents {
                std::fs::write(&path, c).unwrap();
            }
            let settings = HttpSettings {
                ca_file: Some(path),
                ..HttpSettings::default()
            };
            HttpClient::new(&settings).err().map(|e| e.to_string())
        };
        let missing = problem(None).unwrap();
        assert!(
            missing.starts_with("http.ca_file: cannot read"),
            "{missing}"
        );
        assert!(missing.contains("ca.pem"), "{missing}");
        let empty = problem(Some("not a certificate\n")).unwrap();
        assert!(empty.contains("holds no PEM certificate"), "{empty}");
        let broken = problem(Some(
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        ))
        .unwrap();
        assert!(broken.starts_with("http.ca_file: "), "{broken}");

        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(problem(Some(&format!("{}{}", ca.pem(), ca.pem()))), None);
    }

    #[test]
    fn system_roots_build() {
        let settings = HttpSettings {
            system_roots: true,
            ..HttpSettings::default()
        };
        // The test machine has a CA bundle; an empty store would fail
        // every HTTPS call with TlsFailure::Untrusted instead.
        assert!(HttpClient::new(&settings).is_ok());
    }
}
