//! How the client proves who it is to the token endpoint (and, the same
//! way, to the revocation endpoint, RFC 7009 §2.1): the secret in the body
//! (`client_secret_post`), in an HTTP Basic header (`client_secret_basic`,
//! RFC 6749 §2.3.1), or a JWT signed with the client's own key
//! (`private_key_jwt`, RFC 7523 §2.2 and OIDC Core §9). One job: turn a
//! request's parameters into an authenticated request.

use std::{fmt, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use time::OffsetDateTime;
use url::form_urlencoded;

pub use crate::config::{KeyAlg, TokenAuth};

// Discovery is the provider's business, so this part of `TokenAuth` lives here.
impl TokenAuth {
    /// What an OIDC provider uses when config does not say: the first of
    /// Basic, post and (with a key configured) private_key_jwt that
    /// discovery lists. OIDC Discovery §3: an absent list means Basic.
    pub fn from_discovery(supported: Option<&[String]>, has_key: bool) -> TokenAuth {
        let Some(supported) = supported.filter(|s| !s.is_empty()) else {
            return TokenAuth::ClientSecretBasic;
        };
        let listed = |m: TokenAuth| supported.iter().any(|s| s == m.as_str());
        if has_key && listed(TokenAuth::PrivateKeyJwt) && !listed(TokenAuth::ClientSecretBasic) {
            return TokenAuth::PrivateKeyJwt;
        }
        [TokenAuth::ClientSecretBasic, TokenAuth::ClientSecretPost]
            .into_iter()
            .find(|m| listed(*m))
            .unwrap_or(if has_key {
                TokenAuth::PrivateKeyJwt
            } else {
                TokenAuth::ClientSecretBasic
            })
    }
}

/// The client's private key for `private_key_jwt`. No `Debug` of the key.
#[derive(Clone)]
pub struct ClientKey {
    key: EncodingKey,
    alg: Algorithm,
    kid: Option<String>,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// A PEM private key (PKCS#8, or PKCS#1 RSA / SEC1 EC) for `alg`.
    pub fn from_pem(pem: &[u8], alg: KeyAlg, kid: Option<String>) -> Result<ClientKey, String> {
        let (key, alg) = match alg {
            KeyAlg::RS256 => (EncodingKey::from_rsa_pem(pem), Algorithm::RS256),
            KeyAlg::ES256 => (EncodingKey::from_ec_pem(pem), Algorithm::ES256),
        };
        let key = key.map_err(|_| format!("not a PEM private key for {alg:?}"))?;
        Ok(ClientKey { key, alg, kid })
    }

    /// `claims` as a JWT signed with this key, its `kid` in the header (a
    /// self-minted client secret, `signed_secret`).
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, String> {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.key)
            .map_err(|_| "the JWT could not be signed".to_string())
    }
}

/// How long a client assertion is valid: long enough for one request.
const ASSERTION_TTL: Duration = Duration::from_secs(60);
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The client's credentials and the method it presents them with.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    pub method: TokenAuth,
    pub client_id: String,
    pub client_secret: SecretString,
    pub key: Option<ClientKey>,
}

/// What authenticating adds to a request: body parameters and, for Basic,
/// the `Authorization` header value.
#[derive(Default)]
pub struct Credentials {
    pub params: Vec<(String, String)>,
    pub authorization: Option<String>,
}

impl ClientAuth {
    /// The credentials for one request to `audience` (the token endpoint's
    /// URL, which OIDC Core §9 names as the assertion's audience for every
    /// endpoint). `id_param` and `secret_param` are the body names the
    /// provider uses (`appid`, `secret` …); `""` leaves one out.
    pub fn credentials(
        &self,
        id_param: &str,
        secret_param: &str,
        audience: &str,
    ) -> Result<Credentials, String> {
        let mut out = Credentials::default();
        match self.method {
            TokenAuth::ClientSecretPost => {
                if !id_param.is_empty() {
                    out.params.push((id_param.into(), self.client_id.clone()));
                }
                if !secret_param.is_empty() {
                    out.params.push((
                        secret_param.into(),
                        self.client_secret.expose_secret().into(),
                    ));
                }
            }
            TokenAuth::ClientSecretBasic => {
                out.authorization = Some(basic(&self.client_id, &self.client_secret));
            }
            TokenAuth::PrivateKeyJwt => {
                if !id_param.is_empty() {
                    out.params.push((id_param.into(), self.client_id.clone()));
                }
                out.params
                    .push(("client_assertion_type".into(), ASSERTION_TYPE.into()));
                out.params
                    .push(("client_assertion".into(), self.assertion(audience)?));
            }
        }
        Ok(out)
    }

    /// RFC 7523 §3: iss and sub are the client, aud the server, a fresh jti
    /// so the server can refuse a replay, and a short life.
    fn assertion(&self, audience: &str) -> Result<String, String> {
        let key = self
            .key
            .as_ref()
            .ok_or("token_auth = \"private_key_jwt\" needs a private key")?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        // Uniqueness, not secrecy: the thread RNG is enough for a jti.
        let jti: [u8; 16] = rand::random();
        let claims = serde_json::json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "jti": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jti),
            "iat": now,
            "exp": now + ASSERTION_TTL.as_secs() as i64,
        });
        let mut header = Header::new(key.alg);
        header.kid = key.kid.clone();
        jsonwebtoken::encode(&header, &claims, &key.key)
            .map_err(|_| "the client assertion could not be signed".to_string())
    }
}

/// RFC 6749 §2.3.1: id and secret are form-urlencoded before they are
/// joined and base64-encoded, so a `:` or non-ASCII in either survives.
fn basic(id: &str, secret: &SecretString) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", enc(id), enc(secret.expose_secret()));
    format!("Basic {}", STANDARD.encode(pair))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_form_urlencodes_id_and_secret() {
        let header = basic("id:1 é", &SecretString::from("s+/:%"));
        let decoded = STANDARD
            .decode(header.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "id%3A1+%C3%A9:s%2B%2F%3A%25"
        );
    }

    #[test]
    fn discovery_default_puts_basic_first() {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        use TokenAuth::*;
        assert_eq!(TokenAuth::from_discovery(None, false), ClientSecretBasic);
        assert_eq!(
            TokenAuth::from_discovery(
                Some(&list(&["client_secret_post", "client_secret_basic"])),
                false
            ),
            ClientSecretBasic
        );
        assert_eq!(
            TokenAuth::from_discovery(Some(&list(&["client_secret_post"])), false),
            ClientSecretPost
        );
        assert_eq!(
            TokenAuth::from_discovery(Some(&list(&["private_key_jwt"])), true),
            PrivateKeyJwt
        );
    }

    #[test]
    fn private_key_jwt_signs_an_assertion_the_public_key_verifies() {
        let pem = include_bytes!("../../tests/support/keys/rsa.pem");
        let auth = ClientAuth {
            method: TokenAuth::PrivateKeyJwt,
            client_id: "cid".into(),
            client_secret: SecretString::from(""),
            key: Some(ClientKey::from_pem(pem, KeyAlg::RS256, Some("k1".into())).unwrap()),
        };
        let c = auth
            .credentials("client_id", "client_secret", "https://idp/token")
            .unwrap();
        assert!(c.authorization.is_none());
        assert!(!c.params.iter().any(|(k, _)| k == "client_secret"));
        let jwt = &c
            .params
            .iter()
            .find(|(k, _)| k == "client_assertion")
            .unwrap()
            .1;
        let header = jsonwebtoken::decode_header(jwt).unwrap();
        assert_eq!(header.kid.as_deref(), Some("k1"));
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(jwt.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["iss"], "cid");
        assert_eq!(claims["sub"], "cid");
        assert_eq!(claims["aud"], "https://idp/token");
    }
}
