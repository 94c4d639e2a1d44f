//! Caller authentication: `authorization: Bearer <key>` checked against the
//! SHA-256 digests in `[[auth.api_keys]]`. The caller lands in the request's
//! extensions for handlers (audit actor) to read.

use std::sync::Arc;

use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
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

use super::status::error_status;
use crate::config::{ApiKeyConfig, Role};

/// Who is calling, once authenticated.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The API key's name; `None` when running without keys.
    pub name: Option<Arc<str>>,
    pub role: Role,
}

struct Key {
    name: Arc<str>,
    digest: [u8; 32],
    role: Role,
}

#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<Vec<Key>>,
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
    pub fn new(configs: &[ApiKeyConfig], allow_unauthenticated: bool) -> Self {
        let keys = configs
            .iter()
            .filter_map(|k| {
                Some(Key {
                    name: Arc::from(k.name.as_str()),
                    digest: decode_hex(&k.sha256.to_ascii_lowercase())?,
                    role: k.role,
                })
            })
            .collect();
        ApiKeys {
            keys: Arc::new(keys),
            allow_unauthenticated,
        }
    }

    fn find(&self, presented: &str) -> Option<&Key> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare against every key without stopping early, in constant time
        // per comparison, so timing says nothing about which key is close.
        let mut found = None;
        for key in self.keys.iter() {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        found
    }

    /// Authenticates a call from its headers and checks the caller may use
    /// a service needing `needed`.
    pub fn authenticate(&self, headers: &HeaderMap, needed: Role) -> Result<Caller, Status> {
        // Open mode (no keys, explicitly allowed) trusts every caller, so
        // whatever header came is not even hashed.
        if self.keys.is_empty() && self.allow_unauthenticated {
            return Ok(Caller {
                name: None,
                role: Role::Admin,
            });
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(error_status(
                tonic::Code::Unauthenticated,
                "API_KEY_MISSING",
                "send the header `authorization: Bearer <api key>`",
            ));
        };
        let value = value.to_str().unwrap_or("");
        let caller = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .and_then(|k| self.find(k))
            .map(|k| Caller {
                name: Some(k.name.clone()),
                role: k.role,
            })
            .ok_or_else(|| {
                error_status(
                    tonic::Code::Unauthenticated,
                    "API_KEY_INVALID",
                    "the API key in `authorization: Bearer …` is not one this service knows",
                )
            })?;
        if needed == Role::Admin && caller.role != Role::Admin {
            return Err(error_status(
                tonic::Code::PermissionDenied,
                "ROLE_NOT_ALLOWED",
                "this API key's role may not call this service; it needs role \"admin\"",
            ));
        }
        Ok(caller)
    }
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
        match self.keys.authenticate(request.headers(), self.needed) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Either::Right(self.inner.call(request))
            }
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        let digest = |k: &str| {
            Sha256::digest(k.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        ApiKeys::new(
            &[
                ApiKeyConfig {
                    name: "web".into(),
                    sha256: digest("login-key"),
                    role: Role::Login,
                },
                ApiKeyConfig {
                    name: "ops".into(),
                    sha256: digest("admin-key").to_ascii_uppercase(),
                    role: Role::Admin,
                },
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
        use tonic_types::StatusExt;
        s.get_details_error_info().unwrap().reason
    }

    #[test]
    fn keys_and_roles() {
        let k = keys();
        let e = k.authenticate(&req(None), Role::Login).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(reason(&e), "API_KEY_MISSING");
        let e = k
            .authenticate(&req(Some("Bearer nope")), Role::Login)
            .unwrap_err();
        assert_eq!(reason(&e), "API_KEY_INVALID");
        let e = k
            .authenticate(&req(Some("login-key")), Role::Login)
            .unwrap_err();
        assert_eq!(reason(&e), "API_KEY_INVALID");
        let ok = k
            .authenticate(&req(Some("Bearer login-key")), Role::Login)
            .unwrap();
        assert_eq!(ok.name.as_deref(), Some("web"));
        assert_eq!(ok.role, Role::Login);
        let e = k
            .authenticate(&req(Some("Bearer login-key")), Role::Admin)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            k.authenticate(&req(Some("Bearer admin-key")), Role::Admin)
                .is_ok()
        );
        assert!(
            k.authenticate(&req(Some("Bearer admin-key")), Role::Login)
                .is_ok()
        );
    }

    #[test]
    fn a_header_that_is_not_text_is_an_invalid_key() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            http::HeaderValue::from_bytes(b"Bearer \xfflogin-key").unwrap(),
        );
        let e = keys().authenticate(&h, Role::Login).unwrap_err();
        assert_eq!(reason(&e), "API_KEY_INVALID");
    }

    #[test]
    fn open_mode_only_without_keys() {
        let open = ApiKeys::new(&[], true);
        assert!(open.authenticate(&req(None), Role::Admin).is_ok());
        assert!(
            open.authenticate(&req(Some("Bearer anything")), Role::Admin)
                .is_ok()
        );
        let closed = ApiKeys::new(&[], false);
        assert!(closed.authenticate(&req(None), Role::Login).is_err());
    }
}
