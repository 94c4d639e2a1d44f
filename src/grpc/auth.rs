//! Caller authentication: `authorization: Bearer <key>` checked against the
//! SHA-256 digests in `[[auth.api_keys]]`, or, on an mTLS connection without
//! that header, the client certificate's subject CN looked up in
//! `[[auth.client_certs]]`; then the caller's role and its rate limit. The
//! caller lands in the request's extensions for handlers (audit actor) to
//! read.

use std::{collections::HashMap, sync::Arc, time::Duration};

use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use governor::{
    DefaultDirectRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{
    Status,
    body::Body,
    codegen::{
        Service,
        http::{self, HeaderMap},
    },
    server::NamedService,
};
use tonic_types::StatusExt;

use super::{
    socket::PeerInfo,
    status::{code, error_details, error_status},
};
use crate::config::{ApiKeyConfig, ClientCertConfig, Rate, Role};
use crate::reason::Reason;

/// Who is calling, once authenticated.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The API key's or client certificate's name; `None` when running
    /// without keys.
    pub name: Option<Arc<str>>,
    pub role: Role,
}

/// An API key or a mapped client certificate: who it is, what it may do,
/// and how often.
struct Credential {
    name: Arc<str>,
    role: Role,
    limit: Option<Limit>,
}

/// One credential's rate limit. governor's direct limiter is a single
/// atomic cell (GCRA), so checking it takes no lock.
struct Limit {
    limiter: DefaultDirectRateLimiter,
    /// As configured, e.g. `200/s`, for the refusal's message.
    shown: String,
}

impl Credential {
    /// Invalid rates were reported by `Settings::validate`; one that gets
    /// here is ignored (no limit).
    fn new(name: &str, role: Role, rate: Option<&str>) -> Credential {
        let limit = rate.and_then(|shown| {
            let rate = Rate::parse(shown).ok()?;
            let quota = Quota::with_period(rate.per / rate.calls.get())?.allow_burst(rate.calls);
            Some(Limit {
                limiter: RateLimiter::direct(quota),
                shown: shown.trim().to_string(),
            })
        });
        Credential {
            name: Arc::from(name),
            role,
            limit,
        }
    }
}

#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<Vec<([u8; 32], Credential)>>,
    certs: Arc<HashMap<String, Credential>>,
    allow_unauthenticated: bool,
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl ApiKeys {
    /// Malformed digests were reported by `Settings::validate`; any that get
    /// here are skipped, which can only lock callers out, never let them in.
    /// Open mode (every caller is an admin) needs `allow_unauthenticated`
    /// and neither keys nor certificate mappings.
    pub fn new(
        keys: &[ApiKeyConfig],
        certs: &[ClientCertConfig],
        allow_unauthenticated: bool,
    ) -> Self {
        let keys = keys
            .iter()
            .filter_map(|k| {
                let digest = decode_hex(&k.sha256.to_ascii_lowercase())?;
                Some((digest, Credential::new(&k.name, k.role, k.rate.as_deref())))
            })
            .collect();
        let certs = certs
            .iter()
            .map(|c| {
                let credential = Credential::new(&c.name, c.role, c.rate.as_deref());
                (c.subject_cn.clone(), credential)
            })
            .collect();
        ApiKeys {
            keys: Arc::new(keys),
            certs: Arc::new(certs),
            allow_unauthenticated,
        }
    }

    fn open(&self) -> bool {
        self.allow_unauthenticated && self.keys.is_empty() && self.certs.is_empty()
    }

    fn find(&self, presented: &str) -> Option<&Credential> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare against every key without stopping early, in constant time
        // per comparison, so timing says nothing about which key is close.
        let mut found = None;
        for (key, credential) in self.keys.iter() {
            if bool::from(key.ct_eq(&digest)) {
                found = Some(credential);
            }
        }
        found
    }

    /// Authenticates a call from its headers, or from the client
    /// certificate of its connection (`peer`) when it sends no
    /// `authorization` header; checks that the caller may use a service
    /// needing `needed`, and that it is within its rate.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<&PeerInfo>,
        needed: Role,
    ) -> Result<Caller, Status> {
        // Open mode trusts every caller, so whatever header came is not
        // even hashed.
        if self.open() {
            return Ok(Caller {
                name: None,
                role: Role::Admin,
            });
        }
        let credential = match headers.get(http::header::AUTHORIZATION) {
            Some(value) => {
                let value = value.to_str().unwrap_or("");
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .map(str::trim)
                    .and_then(|k| self.find(k))
                    .ok_or_else(|| {
                        error_status(
                            Reason::ApiKeyInvalid,
                            "the API key in `authorization: Bearer …` is not one this service knows",
                        )
                    })?
            }
            None => {
                let cn = peer.and_then(PeerInfo::client_cn);
                match cn.and_then(|cn| self.certs.get(cn)) {
                    Some(credential) => credential,
                    None => return Err(missing(cn)),
                }
            }
        };
        if needed == Role::Admin && credential.role != Role::Admin {
            return Err(error_status(
                Reason::RoleNotAllowed,
                "this caller's role may not call this service; it needs role \"admin\"",
            ));
        }
        if let Some(limit) = &credential.limit
            && let Err(not_until) = limit.limiter.check()
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(rate_limited(&limit.shown, wait));
        }
        Ok(Caller {
            name: Some(credential.name.clone()),
            role: credential.role,
        })
    }
}

/// No key, and no client certificate that stands in for one.
fn missing(client_cn: Option<&str>) -> Status {
    let message = match client_cn {
        Some(cn) => format!(
            "send the header `authorization: Bearer <api key>`; this connection's client \
             certificate (CN {cn:?}) is not mapped in [[auth.client_certs]]"
        ),
        None => "send the header `authorization: Bearer <api key>`".to_string(),
    };
    error_status(Reason::ApiKeyMissing, message)
}

/// RESOURCE_EXHAUSTED with `RATE_LIMITED` and a `RetryInfo` saying when
/// the next call would be let through.
fn rate_limited(limit: &str, wait: Duration) -> Status {
    // Whole milliseconds, rounded up, so a client that waits exactly this
    // long is let through.
    let wait = Duration::from_millis(wait.as_nanos().div_ceil(1_000_000) as u64);
    let mut details = error_details(
        Reason::RateLimited,
        HashMap::from([("limit".to_string(), limit.to_string())]),
    );
    details.set_retry_info(Some(wait));
    Status::with_error_details(
        code(Reason::RateLimited),
        format!(
            "this caller is over its rate of {limit}; retry in {} ms",
            wait.as_millis()
        ),
        details,
    )
}

/// A gRPC service that only authenticated callers reach; the `Caller` lands
/// in the request's extensions.
///
/// A plain tower service rather than tonic's `InterceptedService`: that one
/// takes every request apart into a `tonic::Request` and rebuilds it, which
/// was a measurable share of BeginLogin (BENCHMARKS.md), while the check
/// needs only the headers.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    keys: ApiKeys,
    needed: Role,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, keys: ApiKeys, needed: Role) -> Self {
        Authenticated {
            inner,
            keys,
            needed,
        }
    }
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let peer = request.extensions().get::<PeerInfo>();
        match self.keys.authenticate(request.headers(), peer, self.needed) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Either::Right(self.inner.call(request))
            }
            Err(status) => {
                super::observe::auth_refused(&status);
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(k: &str) -> String {
        Sha256::digest(k.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    }

    fn key(name: &str, key: &str, role: Role, rate: Option<&str>) -> ApiKeyConfig {
        ApiKeyConfig {
            name: name.into(),
            sha256: digest(key),
            role,
            rate: rate.map(Into::into),
        }
    }

    fn cert(cn: &str, name: &str, role: Role) -> ClientCertConfig {
        ClientCertConfig {
            subject_cn: cn.into(),
            name: name.into(),
            role,
            rate: None,
        }
    }

    fn keys() -> ApiKeys {
        let mut ops = key("ops", "admin-key", Role::Admin, None);
        ops.sha256 = ops.sha256.to_ascii_uppercase();
        ApiKeys::new(
            &[key("web", "login-key", Role::Login, None), ops],
            &[
                cert("web-frontend", "frontend", Role::Login),
                cert("ops-console", "console", Role::Admin),
            ],
            false,
        )
    }

    fn req(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert("authorization", a.parse().unwrap());
        }
        h
    }

    fn reason(s: &Status) -> String {
        s.get_details_error_info().unwrap().reason
    }

    #[test]
    fn keys_and_roles() {
        let k = keys();
        let e = k.authenticate(&req(None), None, Role::Login).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(reason(&e), "API_KEY_MISSING");
        let e = k
            .authenticate(&req(Some("Bearer nope")), None, Role::Login)
            .unwrap_err();
        assert_eq!(reason(&e), "API_KEY_INVALID");
        let e = k
            .authenticate(&req(Some("login-key")), None, Role::Login)
            .unwrap_err();
        assert_eq!(reason(&e), "API_KEY_INVALID");
        let ok = k
            .authenticate(&req(Some("Bearer login-key")), None, Role::Login)
            .unwrap();
        assert_eq!(ok.name.as_deref(), Some("web"));
        assert_eq!(ok.role, Role::Login);
        let e = k
            .authenticate(&req(Some("Bearer login-key")), None, Role::Admin)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            k.authenticate(&req(Some("Bearer admin-key")), None, Role::Admin)
                .is_ok()
        );
        assert!(
            k.authenticate(&req(Some("Bearer admin-key")), None, Role::Login)
                .is_ok()
        );
    }

    #[test]
    fn a_mapped_client_certificate_stands_in_for_a_key() {
        let k = keys();
        let frontend = PeerInfo::with_client_cn("web-frontend");
        let ok = k
            .authenticate(&req(None), Some(&frontend), Role::Login)
            .unwrap();
        assert_eq!(ok.name.as_deref(), Some("frontend"));
        assert_eq!(ok.role, Role::Login);
        let e = k
            .authenticate(&req(None), Some(&frontend), Role::Admin)
            .unwrap_err();
        assert_eq!(reason(&e), "ROLE_NOT_ALLOWED");
        let console = PeerInfo::with_client_cn("ops-console");
        let ok = k
            .authenticate(&req(None), Some(&console), Role::Admin)
            .unwrap();
        assert_eq!(ok.name.as_deref(), Some("console"));

        // A key, when sent, decides, valid or not.
        let ok = k
            .authenticate(&req(Some("Bearer admin-key")), Some(&frontend), Role::Admin)
            .unwrap();
        assert_eq!(ok.name.as_deref(), Some("ops"));
        let e = k
            .authenticate(&req(Some("Bearer nope")), Some(&console), Role::Admin)
            .unwrap_err();
        assert_eq!(reason(&e), "API_KEY_INVALID");

        // An unmapped certificate is no credential; the message names it.
        let stranger = PeerInfo::with_client_cn("Web-Frontend");
        let e = k
            .authenticate(&req(None), Some(&stranger), Role::Login)
            .unwrap_err();
        assert_eq!(reason(&e), "API_KEY_MISSING");
        assert!(e.message().contains("\"Web-Frontend\""), "{}", e.message());
    }

    #[test]
    fn a_header_that_is_not_text_is_an_invalid_key() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            http::HeaderValue::from_bytes(b"Bearer \xfflogin-key").unwrap(),
        );
        let e = keys().authenticate(&h, None, Role::Login).unwrap_err();
        assert_eq!(reason(&e), "API_KEY_INVALID");
    }

    #[test]
    fn open_mode_only_without_keys_or_certificates() {
        let open = ApiKeys::new(&[], &[], true);
        assert!(open.authenticate(&req(None), None, Role::Admin).is_ok());
        assert!(
            open.authenticate(&req(Some("Bearer anything")), None, Role::Admin)
                .is_ok()
        );
        let closed = ApiKeys::new(&[], &[], false);
        assert!(closed.authenticate(&req(None), None, Role::Login).is_err());
        let certs_only = ApiKeys::new(&[], &[cert("a", "a", Role::Login)], true);
        let e = certs_only
            .authenticate(&req(None), None, Role::Login)
            .unwrap_err();
        assert_eq!(reason(&e), "API_KEY_MISSING");
    }

    #[test]
    fn over_its_rate_a_key_is_told_when_to_retry() {
        let k = ApiKeys::new(
            &[
                key("slow", "slow-key", Role::Login, Some("3/h")),
                key("free", "free-key", Role::Login, None),
            ],
            &[],
            false,
        );
        for _ in 0..3 {
            k.authenticate(&req(Some("Bearer slow-key")), None, Role::Login)
                .unwrap();
        }
        let e = k
            .authenticate(&req(Some("Bearer slow-key")), None, Role::Login)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(reason(&e), "RATE_LIMITED");
        let info = e.get_details_error_info().unwrap();
        assert_eq!(info.metadata["limit"], "3/h");
        // One call back every 20 minutes.
        let retry = e.get_details_retry_info().unwrap().retry_delay.unwrap();
        assert!(
            retry > Duration::from_secs(19 * 60) && retry <= Duration::from_secs(20 * 60),
            "{retry:?}"
        );
        // Other keys are not held back.
        for _ in 0..10 {
            k.authenticate(&req(Some("Bearer free-key")), None, Role::Login)
                .unwrap();
        }
    }
}
