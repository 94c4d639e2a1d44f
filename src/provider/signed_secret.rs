//! A client secret the client mints itself: a JWT signed with its own key,
//! sent wherever a plain secret would go (`client_secret` in the token and
//! revocation requests). Apple's is the case in point
//! (docs/providers.md#apple): ES256, `iss` the team id, `sub` the client
//! id, `aud` Apple, and at most six months of life. One is signed on first
//! use and kept until half its life is gone, then re-signed, so the secret
//! in use never expires mid-request and the key signs rarely.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use secrecy::SecretString;
use serde::Deserialize;
use time::OffsetDateTime;

use super::client_auth::{ClientKey, KeyAlg};

/// The shortest lifetime a preset may ask for: a secret must outlive the
/// requests made with it by a wide margin.
const MIN_LIFETIME: Duration = Duration::from_secs(3600);

/// A preset's `[client_secret_jwt]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedSecretSpec {
    /// The key type the provider issues (Apple: ES256).
    pub alg: KeyAlg,
    /// The provider option holding the `iss` (Apple: `team_id`).
    pub issuer_option: String,
    /// The `aud`.
    pub audience: String,
    /// How long each signed secret is valid, in seconds (at most what the
    /// provider allows).
    pub lifetime_secs: u64,
}

impl SignedSecretSpec {
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if Duration::from_secs(self.lifetime_secs) < MIN_LIFETIME {
            problems.push(format!(
                "client_secret_jwt.lifetime_secs: at least {}",
                MIN_LIFETIME.as_secs()
            ));
        }
        if self.audience.is_empty() {
            problems.push("client_secret_jwt.audience: required".into());
        }
        problems
    }
}

/// What the minted secret says and the key that signs it.
pub struct SignedSecret {
    key: ClientKey,
    issuer: String,
    subject: String,
    audience: String,
    lifetime: Duration,
    /// The current secret and when to re-sign it. A std Mutex: it is never
    /// held across an `.await`, and signing takes microseconds.
    current: Mutex<Option<(SecretString, Instant)>>,
}

impl SignedSecret {
    pub fn new(spec: &SignedSecretSpec, key: ClientKey, issuer: String, client_id: String) -> Self {
        SignedSecret {
            key,
            issuer,
            subject: client_id,
            audience: spec.audience.clone(),
            lifetime: Duration::from_secs(spec.lifetime_secs),
            current: Mutex::new(None),
        }
    }

    /// The secret to send now, and the instant after which it should no
    /// longer be handed out (half its life).
    pub fn current(&self) -> Result<(SecretString, Instant), String> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((secret, renew_at)) = current.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok((secret.clone(), *renew_at));
        }
        let secret = SecretString::from(self.sign()?);
        let renew_at = Instant::now() + self.lifetime / 2;
        *current = Some((secret.clone(), renew_at));
        Ok((secret, renew_at))
    }

    fn sign(&self) -> Result<String, String> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": self.issuer,
            "iat": now,
            "exp": now + self.lifetime.as_secs() as i64,
            "aud": self.audience,
            "sub": self.subject,
        });
        self.key.sign(&claims)
    }

    /// Forgets the current secret, as if half its life had gone.
    #[cfg(test)]
    fn age(&self) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, renew_at)) = current.as_mut() {
            *renew_at = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use secrecy::ExposeSecret;

    fn apple_like() -> SignedSecretSpec {
        toml::from_str(
            r#"
            alg = "ES256"
            issuer_option = "team_id"
            audience = "https://appleid.example"
            lifetime_secs = 86400
            "#,
        )
        .unwrap()
    }

    fn secret() -> SignedSecret {
        let pem = include_bytes!("../../tests/support/keys/ec.pem");
        let key = ClientKey::from_pem(pem, KeyAlg::ES256, Some("KEY123".into())).unwrap();
        SignedSecret::new(
            &apple_like(),
            key,
            "TEAM123456".into(),
            "com.example.web".into(),
        )
    }

    /// The public half of `tests/support/keys/ec.pem`, from the test keys'
    /// JWK file (`{"ec": {...}, ...}`).
    fn public_key() -> DecodingKey {
        let keys: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/support/keys/jwks.json")).unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(keys["ec"].clone()).unwrap();
        DecodingKey::from_jwk(&jwk).unwrap()
    }

    #[test]
    fn the_secret_is_an_es256_jwt_with_the_claims_the_provider_wants() {
        let s = secret();
        let (jwt, renew_at) = s.current().unwrap();
        let header = jsonwebtoken::decode_header(jwt.expose_secret()).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("KEY123"));
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["https://appleid.example"]);
        v.set_issuer(&["TEAM123456"]);
        let claims =
            jsonwebtoken::decode::<serde_json::Value>(jwt.expose_secret(), &public_key(), &v)
                .unwrap()
                .claims;
        assert_eq!(claims["sub"], "com.example.web");
        let life = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
        assert_eq!(life, 86400);
        let until_renewal = renew_at - Instant::now();
        assert!(until_renewal <= Duration::from_secs(43200));
        assert!(until_renewal > Duration::from_secs(43000));
    }

    #[test]
    fn the_secret_is_kept_until_half_its_life_then_signed_anew() {
        let s = secret();
        let (first, _) = s.current().unwrap();
        let (again, _) = s.current().unwrap();
        assert_eq!(first.expose_secret(), again.expose_secret());
        s.age();
        // A second passes so the new iat differs.
        std::thread::sleep(Duration::from_millis(1100));
        let (renewed, _) = s.current().unwrap();
        assert_ne!(first.expose_secret(), renewed.expose_secret());
    }

    #[test]
    fn a_short_lifetime_is_refused() {
        let mut spec = apple_like();
        assert!(spec.check().is_empty());
        spec.lifetime_secs = 60;
        assert_eq!(spec.check().len(), 1);
    }
}
