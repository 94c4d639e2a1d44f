//! Pending-login state: what authbroker remembers between BeginLogin and
//! CompleteLogin, and the `StateStore` seam that keeps it.

mod entropy;
mod memory;

pub use memory::{Expiring, MemoryStateStore, SingleUse};

use std::{fmt, sync::Arc};

use async_trait::async_trait;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// 32 bytes from the OS RNG. Its text form (base64url, no padding, 43 chars) is
/// what callers and providers see; the raw bytes are what we key on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateToken([u8; 32]);

impl StateToken {
    pub fn generate() -> Result<Self, StateError> {
        Ok(StateToken(random_bytes()?))
    }

    /// Parses the text form. `None` means the value cannot be one we issued.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 43 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
        Some(StateToken(bytes.try_into().ok()?))
    }

    pub fn as_str(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// Appends the text form, sparing BeginLogin an allocation per use.
    pub fn push_to(&self, out: &mut String) {
        URL_SAFE_NO_PAD.encode_string(self.0, out);
    }
}

// A state is a bearer credential for one login; never print it.
impl fmt::Debug for StateToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateToken(..)")
    }
}

/// A PKCE code verifier (RFC 7636): 32 random bytes, sent as 43 base64url chars.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PkceVerifier([u8; 32]);

impl PkceVerifier {
    pub fn generate() -> Result<Self, StateError> {
        Ok(PkceVerifier(random_bytes()?))
    }

    pub fn verifier(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// The S256 challenge: base64url(SHA-256(verifier text)). Only tests
    /// want it as a string; the authorize URL appends it in place.
    #[cfg(test)]
    pub fn challenge_s256(&self) -> String {
        let mut out = String::with_capacity(43);
        self.push_challenge_s256(&mut out);
        out
    }

    /// Appends the S256 challenge without allocating.
    pub fn push_challenge_s256(&self, out: &mut String) {
        let mut text = [0u8; 43];
        // Invariant: 32 bytes are always exactly 43 base64url characters.
        let written = URL_SAFE_NO_PAD
            .encode_slice(self.0, &mut text)
            .expect("32 bytes encode to 43 base64url characters");
        URL_SAFE_NO_PAD.encode_string(Sha256::digest(&text[..written]), out);
    }

    /// Appends the verifier's text form without allocating.
    pub fn push_verifier(&self, out: &mut String) {
        URL_SAFE_NO_PAD.encode_string(self.0, out);
    }
}

impl fmt::Debug for PkceVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PkceVerifier(..)")
    }
}

/// A fresh state, PKCE verifier and OIDC nonce from the OS RNG.
pub fn login_secrets() -> Result<(StateToken, PkceVerifier, PkceVerifier), StateError> {
    let bytes: [u8; 96] = random_bytes()?;
    let part = |i: usize| {
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes[32 * i..32 * (i + 1)]);
        out
    };
    Ok((
        StateToken(part(0)),
        PkceVerifier(part(1)),
        PkceVerifier(part(2)),
    ))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], StateError> {
    let mut bytes = [0u8; N];
    entropy::fill(&mut bytes)?;
    Ok(bytes)
}

/// One login between BeginLogin and CompleteLogin. Shared strings are `Arc`s
/// into the provider's configuration so a million of these stay small.
#[derive(Clone, Debug)]
pub struct PendingLogin {
    pub state: StateToken,
    pub provider: Arc<str>,
    pub redirect_uri: Arc<str>,
    pub scopes: Arc<[String]>,
    pub return_to: Option<Box<str>>,
    pub pkce: Option<PkceVerifier>,
    /// OIDC nonce, for providers that verify ID tokens.
    pub nonce: Option<PkceVerifier>,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the state is not known (never issued, or forgotten long ago)")]
    Unknown,
    #[error("the state has expired")]
    Expired,
    #[error("the state was already used")]
    AlreadyUsed,
    #[error("too many pending logins (limit {capacity})")]
    Full { capacity: u64 },
    #[error("the state store is unavailable")]
    Unavailable(#[source] anyhow::Error),
}

/// Where pending logins live. `take` is atomic: of any number of concurrent
/// callers with one state, exactly one gets the login.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    async fn put(&self, login: PendingLogin) -> Result<(), StateError>;
    async fn take(
        &self,
        state: &StateToken,
        now: OffsetDateTime,
    ) -> Result<PendingLogin, StateError>;
    /// Approximate number of entries held (pending plus recently finished).
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_rejects_garbage() {
        let s = StateToken::generate().unwrap();
        let text = s.as_str();
        assert_eq!(text.len(), 43);
        assert_eq!(StateToken::parse(&text), Some(s));
        assert_eq!(StateToken::parse("short"), None);
        assert_eq!(StateToken::parse(&format!("{}=", &text[..42])), None);
        assert_eq!(StateToken::parse(&"!".repeat(43)), None);
        assert_ne!(StateToken::generate().unwrap(), s);
    }

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        // RFC 7636 Appendix B test vector.
        let raw: [u8; 32] = [
            116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186, 22, 212,
            37, 77, 105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121,
        ];
        let v = PkceVerifier(raw);
        assert_eq!(v.verifier(), "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
        assert_eq!(
            v.challenge_s256(),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let s = StateToken::generate().unwrap();
        assert!(!format!("{s:?}").contains(&s.as_str()));
        let v = PkceVerifier::generate().unwrap();
        assert!(!format!("{v:?}").contains(&v.verifier()));
    }
}
