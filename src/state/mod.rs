//! Pending-login state: what authbroker remembers between BeginLogin and
//! CompleteLogin (and between a `LINK_REQUIRED` outcome and LinkIdentity),
//! and the `StateStore` seam that keeps it: in this process (`memory`), or
//! on an engine that replicas share (`postgres`, `redis`), where `seal`
//! keeps every value unreadable without the token itself.

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
mod entropy;
mod memory;
mod postgres;
mod redis;
mod seal;

pub use memory::MemoryStateStore;
pub use postgres::PostgresStateStore;
pub use redis::RedisStateStore;

use std::{fmt, sync::Arc, time::Duration};

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

    /// The raw secret, for the shared backends' key derivation only.
    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The token an entry is stored under when `owner` (an API key's name)
    /// was issued it: SHA-256 of the owner's name and this token. A caller
    /// presenting the token under another key looks up another entry and
    /// hears "unknown", exactly as for a token never issued, and its claim
    /// touches nothing of the owner's, who can still complete. No owner
    /// (open mode) stores under the token itself.
    ///
    /// Deriving the key, rather than keeping the owner in the entry and
    /// checking it after `claim`, needs nothing of the backends: a wrong
    /// key never reaches the entry, so there is no claim to undo.
    pub fn owned_by(&self, owner: Option<&str>) -> StateToken {
        let Some(owner) = owner else {
            return *self;
        };
        let mut h = Sha256::new();
        h.update(OWNER_LABEL);
        h.update((owner.len() as u64).to_be_bytes());
        h.update(owner.as_bytes());
        h.update(self.0);
        StateToken(h.finalize().into())
    }
}

/// Keeps `owned_by`'s keys apart from every other hash of a token.
const OWNER_LABEL: &[u8] = b"authbroker/state/owner/v1\0";

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

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        PkceVerifier(bytes)
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

/// Which namespace a token belongs to. A state is never accepted as a link
/// ticket or the other way round, on any backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A state from BeginLogin.
    Login,
    /// A link ticket from an `OUTCOME_LINK_REQUIRED` login.
    Ticket,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Login => "login",
            Kind::Ticket => "ticket",
        }
    }
}

/// What the store keeps until the token comes back.
#[derive(Clone, Debug)]
pub enum Pending {
    Login(PendingLogin),
    /// A link ticket: the login layer's own serialised form, opaque here.
    Ticket {
        expires_at: OffsetDateTime,
        payload: Arc<[u8]>,
    },
}

impl Pending {
    pub fn kind(&self) -> Kind {
        match self {
            Pending::Login(_) => Kind::Login,
            Pending::Ticket { .. } => Kind::Ticket,
        }
    }

    pub fn expires_at(&self) -> OffsetDateTime {
        match self {
            Pending::Login(l) => l.expires_at,
            Pending::Ticket { expires_at, .. } => *expires_at,
        }
    }
}

/// SHA-256 of what an attempt presented with the token (the authorization
/// code, the provider's error, or the user id a ticket is redeemed for).
/// Only a retry that presents the same thing may resume the attempt.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(parts: &[&str]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            h.update((p.len() as u64).to_be_bytes());
            h.update(p.as_bytes());
        }
        Fingerprint(h.finalize().into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

/// A claimed entry: the first attempt (`attempt == 1`, no progress), or a
/// retry of an attempt that released it, with what that attempt left.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub pending: Pending,
    /// 1 for the first attempt; each retry adds one. `release` and
    /// `finish` name it, so a stale attempt cannot touch a newer one's claim.
    pub attempt: u32,
    /// What the previous attempt recorded with `release`, if anything.
    pub progress: Option<Vec<u8>>,
}

/// How long entries live, and how many may be held. One value for every
/// backend, so they agree on what each answer means.
#[derive(Clone, Copy, Debug)]
pub struct StateLimits {
    /// Most entries that are pending or claimed at once (`login.max_pending`).
    pub capacity: u64,
    /// How long an unclaimed entry outlives its expiry, so that a late
    /// callback hears "expired" rather than "unknown".
    pub grace: Duration,
    /// How long an attempt holds its claim before a retry may take over
    /// (the attempt crashed without releasing it).
    pub lease: Duration,
    /// How long after its first claim an entry can still be retried.
    pub retry_window: Duration,
}

impl StateLimits {
    /// The limits every state backend applies, from the settings.
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        StateLimits {
            capacity: settings.login.max_pending,
            // Entries outlive their TTL by one more TTL so a late callback
            // is told "expired" rather than "unknown".
            grace: settings.login.state_ttl,
            lease: settings.attempt_lease(),
            retry_window: settings.login.retry_window,
        }
    }

    /// For tests and tools: generous lifetimes, the given capacity.
    pub fn with_capacity(capacity: u64) -> Self {
        StateLimits {
            capacity,
            grace: Duration::from_secs(600),
            lease: Duration::from_secs(60),
            retry_window: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the state is not known (never issued, or forgotten long ago)")]
    Unknown,
    #[error("the state has expired")]
    Expired,
    #[error("the state was already used")]
    AlreadyUsed,
    /// Another attempt with the same state and code holds the claim.
    #[error("another attempt with this state is still in progress")]
    InProgress,
    #[error("too many pending logins (limit {capacity})")]
    Full { capacity: u64 },
    #[error("the state store is unavailable")]
    Unavailable(#[source] anyhow::Error),
}

/// Where pending logins and link tickets live between the call that issues
/// a token and the call that redeems it.
///
/// An entry is *pending* after `put`, *claimed* while an attempt to redeem
/// it runs (and after a retryable failure, until its retry window ends),
/// and *finished* after `finish` or `cancel`. Each transition is one atomic
/// operation on every backend: of any number of concurrent claims, exactly
/// one wins. A finished entry frees its place in `capacity` at once and is
/// remembered as used for replay detection until its grace period ends.
///
/// `claim` answers, in this order: `Unknown` (no such entry of this kind,
/// or one forgotten after its deadline), `AlreadyUsed` (finished, claimed
/// with another fingerprint, or its retry window is over: `Unknown` instead
/// once the backend has forgotten it), `Expired` (pending past its expiry;
/// this finishes it),
/// `InProgress` (same fingerprint, another attempt holds the lease), else
/// the claim.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// `memory`, `postgres` or `redis`: for health, metrics and logs.
    fn backend(&self) -> &'static str;

    /// Adds a pending entry under `token`; `Full` when `capacity` entries
    /// are already pending or claimed.
    async fn put(&self, token: &StateToken, pending: Pending) -> Result<(), StateError>;

    async fn claim(
        &self,
        kind: Kind,
        token: &StateToken,
        fingerprint: &Fingerprint,
        now: OffsetDateTime,
    ) -> Result<Claimed, StateError>;

    /// Ends `attempt` after a retryable failure: the claim stays (so other
    /// fingerprints still hear "already used"), the lease is given up, and
    /// `progress` is what the next attempt resumes from. A no-op if a newer
    /// attempt holds the claim or the entry is gone.
    async fn release(
        &self,
        kind: Kind,
        token: &StateToken,
        attempt: u32,
        progress: Option<Vec<u8>>,
    ) -> Result<(), StateError>;

    /// Ends the entry after `attempt` succeeded or failed for good. A no-op
    /// if a newer attempt holds the claim or the entry is gone.
    async fn finish(&self, kind: Kind, token: &StateToken, attempt: u32) -> Result<(), StateError>;

    /// Ends a pending or claimed entry whatever its attempts are doing.
    /// `Expired` if it was pending past its expiry (it is finished all the
    /// same), `Unknown` or `AlreadyUsed` as for `claim`.
    async fn cancel(
        &self,
        kind: Kind,
        token: &StateToken,
        now: OffsetDateTime,
    ) -> Result<(), StateError>;

    /// Makes the backend ready (e.g. migrates its table). Idempotent;
    /// readiness retries it until it succeeds.
    async fn prepare(&self) -> Result<(), StateError> {
        Ok(())
    }

    /// A round trip to the backend, for health.
    async fn ping(&self) -> Result<(), StateError>;

    /// Entries pending or claimed (of both kinds). Exact for `memory` when
    /// nothing is under way; for shared backends, as of the last count.
    async fn held(&self) -> Result<u64, StateError>;
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
    fn an_owner_gets_a_key_of_its_own() {
        let s = StateToken::generate().unwrap();
        assert_eq!(s.owned_by(None), s, "open mode keys by the token");
        let web = s.owned_by(Some("web"));
        assert_eq!(web, s.owned_by(Some("web")), "deterministic");
        assert_ne!(web, s);
        assert_ne!(web, s.owned_by(Some("shop")));
        assert_ne!(web, s.owned_by(Some("web ")));
        assert_ne!(web, StateToken::generate().unwrap().owned_by(Some("web")));
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
