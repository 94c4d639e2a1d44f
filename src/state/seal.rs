//! What the shared backends write, so that a reader of the Postgres table or
//! the Redis keys cannot complete a login:
//! - the lookup key is SHA-256 of the token (with a label per kind), never
//!   the token itself;
//! - every value (provider, redirect URI, scopes, `return_to`, PKCE
//!   verifier, OIDC nonce; a ticket's identity and provider tokens; an
//!   attempt's progress) is sealed with XChaCha20-Poly1305 under a key
//!   derived from the token, which the store never sees.
//!
//! Only the caller holding the token can open its entry, and that caller
//! already could complete the login. No configured key is needed, so
//! nothing here needs rotating; a replica that restarts can still open what
//! another replica wrote.

use std::sync::Arc;

use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{Kind, Pending, PendingLogin, PkceVerifier, StateError, StateToken, entropy};

/// Bytes of an XChaCha20 nonce, drawn at random for every seal.
const NONCE_BYTES: usize = 24;

/// Different labels keep the lookup key and the sealing key unrelated, and
/// a state's entry unusable as a ticket's.
const KEY_LABEL: &[u8] = b"authbroker/state/lookup/v1\0";
const SEAL_LABEL: &[u8] = b"authbroker/state/seal/v1\0";

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Login => b'L',
        Kind::Ticket => b'T',
    }
}

/// What the store keys the entry by.
pub(crate) fn lookup_key(kind: Kind, token: &StateToken) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(KEY_LABEL);
    h.update([kind_byte(kind)]);
    h.update(token.as_bytes());
    h.finalize().into()
}

fn cipher(kind: Kind, token: &StateToken) -> XChaCha20Poly1305 {
    let mut h = Sha256::new();
    h.update(SEAL_LABEL);
    h.update([kind_byte(kind)]);
    h.update(token.as_bytes());
    let key: [u8; 32] = h.finalize().into();
    XChaCha20Poly1305::new(&key.into())
}

/// Which sealed value this is; bound in as associated data, so a progress
/// blob can never be opened as the pending entry or the other way round.
#[derive(Clone, Copy)]
pub(crate) enum Part {
    Pending,
    Progress,
}

impl Part {
    fn label(self) -> &'static [u8] {
        match self {
            Part::Pending => b"pending",
            Part::Progress => b"progress",
        }
    }
}

fn seal(kind: Kind, token: &StateToken, part: Part, plain: &[u8]) -> Result<Vec<u8>, StateError> {
    let mut nonce = [0u8; NONCE_BYTES];
    entropy::fill(&mut nonce)?;
    let sealed = cipher(kind, token)
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: part.label(),
            },
        )
        .map_err(|_| StateError::Unavailable(anyhow::anyhow!("sealing a state entry failed")))?;
    let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// `None` when the bytes were not sealed under this token's key: a forged
/// or corrupted entry, which callers treat as unknown.
fn open(kind: Kind, token: &StateToken, part: Part, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_BYTES {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_BYTES);
    cipher(kind, token)
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: body,
                aad: part.label(),
            },
        )
        .ok()
}

/// A pending login's fields in a form serde can write.
#[derive(Serialize, Deserialize)]
struct LoginRecord {
    provider: String,
    redirect_uri: String,
    scopes: Vec<String>,
    return_to: Option<String>,
    pkce: Option<[u8; 32]>,
    nonce: Option<[u8; 32]>,
    #[serde(with = "time::serde::timestamp::microseconds")]
    created_at: OffsetDateTime,
}

pub(crate) fn seal_pending(token: &StateToken, pending: &Pending) -> Result<Vec<u8>, StateError> {
    match pending {
        Pending::Login(login) => {
            let record = LoginRecord {
                provider: login.provider.to_string(),
                redirect_uri: login.redirect_uri.to_string(),
                scopes: login.scopes.to_vec(),
                return_to: login.return_to.as_deref().map(str::to_string),
                pkce: login.pkce.map(|p| *p.as_bytes()),
                nonce: login.nonce.map(|n| *n.as_bytes()),
                created_at: login.created_at,
            };
            let plain = serde_json::to_vec(&record).map_err(|e| {
                StateError::Unavailable(anyhow::Error::new(e).context("encoding a pending login"))
            })?;
            seal(Kind::Login, token, Part::Pending, &plain)
        }
        Pending::Ticket { payload, .. } => seal(Kind::Ticket, token, Part::Pending, payload),
    }
}

/// Opens what `seal_pending` wrote. `expires_at` is kept in the clear by
/// the backend (it drives expiry) and handed back here.
pub(crate) fn open_pending(
    kind: Kind,
    token: &StateToken,
    expires_at: OffsetDateTime,
    sealed: &[u8],
) -> Result<Pending, StateError> {
    let plain = open(kind, token, Part::Pending, sealed).ok_or_else(forged)?;
    match kind {
        Kind::Ticket => Ok(Pending::Ticket {
            expires_at,
            payload: Arc::from(plain),
        }),
        Kind::Login => {
            let r: LoginRecord = serde_json::from_slice(&plain).map_err(|_| forged())?;
            Ok(Pending::Login(PendingLogin {
                state: *token,
                provider: Arc::from(r.provider),
                redirect_uri: Arc::from(r.redirect_uri),
                scopes: Arc::from(r.scopes),
                return_to: r.return_to.map(String::into_boxed_str),
                pkce: r.pkce.map(PkceVerifier::from_bytes),
                nonce: r.nonce.map(PkceVerifier::from_bytes),
                created_at: r.created_at,
                expires_at,
            }))
        }
    }
}

pub(crate) fn seal_progress(
    kind: Kind,
    token: &StateToken,
    progress: &[u8],
) -> Result<Vec<u8>, StateError> {
    seal(kind, token, Part::Progress, progress)
}

pub(crate) fn open_progress(
    kind: Kind,
    token: &StateToken,
    sealed: &[u8],
) -> Result<Vec<u8>, StateError> {
    open(kind, token, Part::Progress, sealed).ok_or_else(forged)
}

/// An entry under this token's key that its key does not open was not
/// written by us for this token: answer as if it did not exist.
fn forged() -> StateError {
    tracing::warn!("a state entry could not be opened with its token; treating it as unknown");
    StateError::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> (StateToken, Pending) {
        let (state, pkce, nonce) = crate::state::login_secrets().unwrap();
        let now = OffsetDateTime::now_utc();
        let login = PendingLogin {
            state,
            provider: "github".into(),
            redirect_uri: "https://app.example/cb".into(),
            scopes: Arc::from(vec!["read:user".to_string()]),
            return_to: Some("/orders?id=3".into()),
            pkce: Some(pkce),
            nonce: Some(nonce),
            created_at: now,
            expires_at: now + time::Duration::minutes(10),
        };
        (state, Pending::Login(login))
    }

    #[test]
    fn a_login_round_trips_and_hides_its_secrets() {
        let (token, pending) = login();
        let sealed = seal_pending(&token, &pending).unwrap();
        let Pending::Login(original) = &pending else {
            unreachable!()
        };
        for secret in [
            token.as_str(),
            original.pkce.unwrap().verifier(),
            original.nonce.unwrap().verifier(),
            "orders".to_string(),
        ] {
            assert!(
                !String::from_utf8_lossy(&sealed).contains(&secret),
                "the sealed entry shows a secret"
            );
        }
        let Pending::Login(opened) =
            open_pending(Kind::Login, &token, original.expires_at, &sealed).unwrap()
        else {
            panic!("a login opened as something else")
        };
        assert_eq!(opened.state, token);
        assert_eq!(&*opened.provider, "github");
        assert_eq!(&*opened.redirect_uri, "https://app.example/cb");
        assert_eq!(opened.scopes.to_vec(), vec!["read:user".to_string()]);
        assert_eq!(opened.return_to.as_deref(), Some("/orders?id=3"));
        assert_eq!(opened.pkce, original.pkce);
        assert_eq!(opened.nonce, original.nonce);
        assert_eq!(
            opened.created_at.unix_timestamp_nanos() / 1000,
            original.created_at.unix_timestamp_nanos() / 1000
        );
    }

    #[test]
    fn another_token_kind_or_part_cannot_open_it() {
        let (token, pending) = login();
        let sealed = seal_pending(&token, &pending).unwrap();
        let at = pending.expires_at();
        let other = StateToken::generate().unwrap();
        assert!(matches!(
            open_pending(Kind::Login, &other, at, &sealed),
            Err(StateError::Unknown)
        ));
        assert!(matches!(
            open_pending(Kind::Ticket, &token, at, &sealed),
            Err(StateError::Unknown)
        ));
        assert!(matches!(
            open_progress(Kind::Login, &token, &sealed),
            Err(StateError::Unknown)
        ));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(open_pending(Kind::Login, &token, at, &flipped).is_err());
        assert!(open_pending(Kind::Login, &token, at, &sealed[..10]).is_err());
    }

    #[test]
    fn lookup_keys_differ_by_kind_and_hide_the_token() {
        let token = StateToken::generate().unwrap();
        let login = lookup_key(Kind::Login, &token);
        assert_ne!(login, lookup_key(Kind::Ticket, &token));
        assert_ne!(&login, token.as_bytes());
        assert_eq!(login, lookup_key(Kind::Login, &token));
    }

    #[test]
    fn progress_round_trips() {
        let token = StateToken::generate().unwrap();
        let sealed = seal_progress(Kind::Ticket, &token, b"resume here").unwrap();
        assert_eq!(
            open_progress(Kind::Ticket, &token, &sealed).unwrap(),
            b"resume here"
        );
        assert!(open_progress(Kind::Login, &token, &sealed).is_err());
    }
}
