//! Caller authentication: `authorization: Bearer <key>` checked against the
//! SHA-256 digests in `[[auth.api_keys]]`. The caller lands in the request's
//! extensions for handlers (audit actor) to read.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

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

    /// Authenticates a request and checks the caller may use a service
    /// needing `needed`.
    pub fn check<T>(&self, mut request: Request<T>, needed: Role) -> Result<Request<T>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or(""));
        let caller = match header {
            None if self.keys.is_empty() && self.allow_unauthenticated => Caller {
                name: None,
                role: Role::Admin,
            },
            None => {
                return Err(error_status(
                    tonic::Code::Unauthenticated,
                    "API_KEY_MISSING",
                    "send the header `authorization: Bearer <api key>`",
                ));
            }
            Some(value) => {
                let key = value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .map(str::trim)
                    .and_then(|k| self.find(k));
                match key {
                    Some(k) => Caller {
                        name: Some(k.name.clone()),
                        role: k.role,
                    },
                    None if self.keys.is_empty() && self.allow_unauthenticated => Caller {
                        name: None,
                        role: Role::Admin,
                    },
                    None => {
                        return Err(error_status(
                            tonic::Code::Unauthenticated,
                            "API_KEY_INVALID",
                            "the API key in `authorization: Bearer …` is not one this service knows",
                        ));
                    }
                }
            }
        };
        if needed == Role::Admin && caller.role != Role::Admin {
            return Err(error_status(
                tonic::Code::PermissionDenied,
                "ROLE_NOT_ALLOWED",
                "this API key's role may not call this service; it needs role \"admin\"",
            ));
        }
        request.extensions_mut().insert(caller);
        Ok(request)
    }
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

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    fn reason(s: &Status) -> String {
        use tonic_types::StatusExt;
        s.get_details_error_info().unwrap().reason
    }

    #[test]
    fn keys_and_roles() {
        let k = keys();
        let e = k.check(req(None), Role::Login).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(reason(&e), "API_KEY_MISSING");
        let e = k.check(req(Some("Bearer nope")), Role::Login).unwrap_err();
        assert_eq!(reason(&e), "API_KEY_INVALID");
        let e = k.check(req(Some("login-key")), Role::Login).unwrap_err();
        assert_eq!(reason(&e), "API_KEY_INVALID");
        let ok = k.check(req(Some("Bearer login-key")), Role::Login).unwrap();
        assert_eq!(
            ok.extensions().get::<Caller>().unwrap().name.as_deref(),
            Some("web")
        );
        let e = k
            .check(req(Some("Bearer login-key")), Role::Admin)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(k.check(req(Some("Bearer admin-key")), Role::Admin).is_ok());
        assert!(k.check(req(Some("Bearer admin-key")), Role::Login).is_ok());
    }

    #[test]
    fn open_mode_only_without_keys() {
        let open = ApiKeys::new(&[], true);
        assert!(open.check(req(None), Role::Admin).is_ok());
        let closed = ApiKeys::new(&[], false);
        assert!(closed.check(req(None), Role::Login).is_err());
    }
}
