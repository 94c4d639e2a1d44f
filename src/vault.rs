//! Provider tokens sealed at rest: XChaCha20-Poly1305 under a ring of
//! configured keys. The newest key seals, every key opens, so keys rotate
//! without downtime: add a key, restart, run `authbroker rotate-keys`, then
//! retire the old key. The store only ever sees [`SealedToken`].
//!
//! Why XChaCha20-Poly1305: its 192-bit nonces can be drawn at random for
//! every seal with no counter to keep and no birthday risk at any volume
//! (96-bit AES-GCM nonces would need care past ~2^32 seals per key), and it
//! is constant-time in software on every CPU.
//!
//! The AAD binds each ciphertext to its identity row (provider, subject) and
//! to its key id, so a row copied or moved onto another identity, or
//! relabelled with another key id, fails to open.

use std::{fmt, io, path::PathBuf, time::Duration};

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload, rand_core::OsRng, rand_core::RngCore},
};
use secrecy::{ExposeSecret, SecretString, zeroize::Zeroizing};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::domain::SealedToken;
use crate::store::{Conflict, Store, StoreError};

/// Bytes in a key, base64-decoded.
const KEY_LEN: usize = 32;
/// Bytes in an XChaCha20 nonce.
const NONCE_LEN: usize = 24;
/// Domain separation for the AAD; a new plaintext or AAD layout gets a new
/// tag, so old and new ciphertexts can never be confused.
const AAD_CONTEXT: &[u8] = b"authbroker/vault/v1\0";
/// Rows per `list_tokens` page during rotation.
const ROTATE_PAGE: u32 = 500;
/// Compare-and-swap attempts per row before `rotate` gives up (the row is
/// being rewritten faster than we can re-read it; rerunning is safe).
const ROTATE_ATTEMPTS: usize = 5;

/// `[vault]` in the config file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultSettings {
    /// Encryption keys, oldest first: the LAST one encrypts, every one decrypts.
    pub keys: Vec<VaultKeyConfig>,
    /// GetProviderToken refreshes a token this close to its expiry.
    #[serde(with = "humantime_serde")]
    pub refresh_skew: Duration,
}

impl Default for VaultSettings {
    fn default() -> Self {
        VaultSettings {
            keys: Vec::new(),
            refresh_skew: Duration::from_secs(60),
        }
    }
}

/// One `[[vault.keys]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VaultKeyConfig {
    /// Stored next to each ciphertext; 1-64 chars `[A-Za-z0-9_.-]`.
    pub id: String,
    /// 32 bytes, base64 (standard or url-safe, padding optional). Exactly
    /// one of `key` / `key_file` / `key_env`.
    #[serde(default, skip_serializing)]
    pub key: Option<SecretString>,
    /// A file holding the base64 key (surrounding whitespace is ignored).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name of an environment variable holding the base64 key.
    #[serde(default)]
    pub key_env: Option<String>,
}

impl VaultSettings {
    /// Every problem at once: bad or duplicate ids, not exactly one key
    /// source, unreadable files, missing variables, bad base64, wrong
    /// length. Messages name the offending entry but never carry key
    /// material. Loads (and then zeroizes) every key to check it.
    pub fn validate(&self) -> Vec<String> {
        match self.load_keys() {
            Ok(_) => Vec::new(),
            Err(problems) => problems,
        }
    }

    fn load_keys(&self) -> Result<Vec<VaultKey>, Vec<String>> {
        let mut problems = Vec::new();
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut seen = std::collections::BTreeSet::new();
        for (i, entry) in self.keys.iter().enumerate() {
            let id_ok = valid_key_id(&entry.id);
            if !id_ok {
                // Not echoed: a malformed id may be a key pasted in the wrong place.
                problems.push(format!(
                    "vault.keys[{i}].id: must be 1-64 characters from A-Z a-z 0-9 _ . -"
                ));
            } else if !seen.insert(entry.id.as_str()) {
                problems.push(format!("vault.keys[{i}].id: {:?} is used twice", entry.id));
            }
            if let Some(cipher) = load_key(i, entry, &mut problems)
                && id_ok
            {
                keys.push(VaultKey {
                    id: entry.id.clone(),
                    cipher,
                });
            }
        }
        if problems.is_empty() {
            Ok(keys)
        } else {
            Err(problems)
        }
    }
}

/// Reads and decodes one entry's key, or explains (without key material)
/// why it cannot.
fn load_key(
    i: usize,
    entry: &VaultKeyConfig,
    problems: &mut Vec<String>,
) -> Option<XChaCha20Poly1305> {
    let (field, text): (&str, Zeroizing<String>) =
        match (&entry.key, &entry.key_file, &entry.key_env) {
            (Some(key), None, None) => ("key", Zeroizing::new(key.expose_secret().to_owned())),
            (None, Some(path), None) => match std::fs::read_to_string(path) {
                Ok(text) => ("key_file", Zeroizing::new(text)),
                Err(e) => {
                    let shown = path.to_string_lossy();
                    problems.push(if decode_key(&shown).is_ok() {
                        format!(
                            "vault.keys[{i}].key_file: holds what looks like a key; \
                             put the path of a file holding the key here"
                        )
                    } else {
                        format!(
                            "vault.keys[{i}].key_file: cannot read {}: {e}",
                            path.display()
                        )
                    });
                    return None;
                }
            },
            (None, None, Some(name)) => {
                if decode_key(name).is_ok() {
                    problems.push(format!(
                        "vault.keys[{i}].key_env: holds what looks like a key; \
                         put the name of an environment variable here"
                    ));
                    return None;
                }
                if name.is_empty() || name.contains(['=', '\0']) {
                    problems.push(format!(
                        "vault.keys[{i}].key_env: {name:?} is not an environment variable name"
                    ));
                    return None;
                }
                match std::env::var(name) {
                    Ok(text) => ("key_env", Zeroizing::new(text)),
                    Err(std::env::VarError::NotPresent) => {
                        problems.push(format!(
                            "vault.keys[{i}].key_env: environment variable {name:?} is not set"
                        ));
                        return None;
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        problems.push(format!(
                            "vault.keys[{i}].key_env: environment variable {name:?} \
                             is not valid UTF-8"
                        ));
                        return None;
                    }
                }
            }
            _ => {
                let count = usize::from(entry.key.is_some())
                    + usize::from(entry.key_file.is_some())
                    + usize::from(entry.key_env.is_some());
                problems.push(format!(
                    "vault.keys[{i}]: set exactly one of key, key_file, key_env ({count} set)"
                ));
                return None;
            }
        };
    match decode_key(&text) {
        Ok(key) => Some(key),
        Err(KeyProblem::NotBase64) => {
            problems.push(format!(
                "vault.keys[{i}].{field}: is not valid base64 \
                 (expected 32 random bytes, base64-encoded)"
            ));
            None
        }
        Err(KeyProblem::Length(n)) => {
            problems.push(format!(
                "vault.keys[{i}].{field}: must decode to {KEY_LEN} bytes, got {n}"
            ));
            None
        }
    }
}

enum KeyProblem {
    NotBase64,
    Length(usize),
}

/// Standard or url-safe base64, padding optional, surrounding whitespace
/// ignored. The decoded bytes are zeroized once copied into the cipher.
fn decode_key(text: &str) -> Result<XChaCha20Poly1305, KeyProblem> {
    let text = text.trim();
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let alphabet = if text.contains(['-', '_']) {
        &alphabet::URL_SAFE
    } else {
        &alphabet::STANDARD
    };
    // The base64 error is dropped: it quotes the offending byte.
    let bytes = Zeroizing::new(
        GeneralPurpose::new(alphabet, config)
            .decode(text)
            .map_err(|_| KeyProblem::NotBase64)?,
    );
    if bytes.len() != KEY_LEN {
        return Err(KeyProblem::Length(bytes.len()));
    }
    // The cipher keeps its own copy of the key and zeroizes it on drop.
    XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| KeyProblem::Length(bytes.len()))
}

fn valid_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// One key of the ring. `XChaCha20Poly1305` zeroizes its key on drop.
#[derive(Clone)]
struct VaultKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The key ring: seals with the newest key, opens with any.
#[derive(Clone)]
pub struct Vault {
    /// The newest configured key; every seal uses it.
    current: VaultKey,
    /// Older keys, still accepted for opening.
    previous: Vec<VaultKey>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What is sealed: one identity's provider tokens.
#[derive(Clone)]
pub struct VaultTokens {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub token_type: Option<String>,
    pub scopes: Vec<String>,
    /// Kept to the second (sealed as unix seconds).
    pub expires_at: Option<OffsetDateTime>,
}

impl fmt::Debug for VaultTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultTokens")
            .field("access_token", &"[REDACTED]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("token_type", &self.token_type)
            .field("scopes", &self.scopes)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("sealed with key {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("the sealed token does not decrypt (wrong row, tampered, or wrong key material)")]
    Corrupt,
    #[error("the OS random number generator failed")]
    Rng,
}

/// The sealed plaintext, borrowed for sealing: compact JSON, absent
/// optionals omitted.
#[derive(Serialize)]
struct PlainRef<'a> {
    access_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_type: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    scopes: &'a [String],
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
}

/// The sealed plaintext, parsed when opening. Unknown fields are ignored so
/// that a newer writer does not lock older readers out during a rollout.
#[derive(Deserialize)]
struct PlainOwned {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    expires_at: Option<i64>,
}

/// An `io::Write` that only counts, to size the plaintext buffer exactly:
/// a growing `Vec` would leave unzeroized copies behind when it reallocates.
struct ByteCount(usize);

impl io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Vault {
    /// `None` when no keys are configured. `Err` lists every problem, as
    /// [`VaultSettings::validate`] does.
    pub fn from_settings(settings: &VaultSettings) -> Result<Option<Vault>, Vec<String>> {
        let mut keys = settings.load_keys()?;
        Ok(keys.pop().map(|current| Vault {
            current,
            previous: keys,
        }))
    }

    /// The id of the key that seals.
    pub fn current_key_id(&self) -> &str {
        &self.current.id
    }

    /// Sealed with the newest key?
    pub fn is_current(&self, sealed: &SealedToken) -> bool {
        sealed.key_id == self.current.id
    }

    /// Encrypts with the newest key under a fresh random nonce from the OS
    /// RNG, bound to `(provider, subject)`. The result has version 0, is
    /// usable, and was updated at `now`.
    pub fn seal(
        &self,
        provider: &str,
        subject: &str,
        tokens: &VaultTokens,
        now: OffsetDateTime,
    ) -> Result<SealedToken, VaultError> {
        let plain = PlainRef {
            access_token: tokens.access_token.expose_secret(),
            refresh_token: tokens.refresh_token.as_ref().map(|t| t.expose_secret()),
            token_type: tokens.token_type.as_deref(),
            scopes: &tokens.scopes,
            expires_at: tokens.expires_at.map(OffsetDateTime::unix_timestamp),
        };
        // Invariant: serializing strings and integers into memory cannot fail.
        let mut count = ByteCount(0);
        serde_json::to_writer(&mut count, &plain).expect("serializing to a counter cannot fail");
        let mut buf = Zeroizing::new(Vec::with_capacity(count.0));
        serde_json::to_writer(&mut *buf, &plain).expect("serializing to a Vec cannot fail");

        let mut nonce = [0u8; NONCE_LEN];
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|_| VaultError::Rng)?;
        let key = &self.current;
        let aad = aad(provider, subject, &key.id);
        // Invariant: XChaCha20-Poly1305 refuses only messages over 256 GiB;
        // a token set is a few KiB (provider answers are capped at
        // `http.max_response_bytes`).
        let ciphertext = key
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &buf,
                    aad: &aad,
                },
            )
            .expect("a token set is far below the AEAD message limit");
        Ok(SealedToken {
            key_id: key.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
            version: 0,
            usable: true,
            updated_at: now,
        })
    }

    /// Decrypts a token sealed for `(provider, subject)` with any configured
    /// key. `Corrupt` covers a row moved to another identity, tampering and
    /// wrong key material alike: the AEAD cannot tell them apart.
    pub fn open(
        &self,
        provider: &str,
        subject: &str,
        sealed: &SealedToken,
    ) -> Result<VaultTokens, VaultError> {
        let key = self
            .key(&sealed.key_id)
            .ok_or_else(|| VaultError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.nonce.len() != NONCE_LEN {
            return Err(VaultError::Corrupt);
        }
        let aad = aad(provider, subject, &key.id);
        let plain = Zeroizing::new(
            key.cipher
                .decrypt(
                    XNonce::from_slice(&sealed.nonce),
                    Payload {
                        msg: &sealed.ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| VaultError::Corrupt)?,
        );
        // Authentic but unparsable means a writer bug; the row is unusable
        // either way. Token strings without JSON escapes are copied straight
        // from `plain` into exactly-sized strings, which `SecretString` then
        // owns and zeroizes.
        let parsed: PlainOwned = serde_json::from_slice(&plain).map_err(|_| VaultError::Corrupt)?;
        let expires_at = match parsed.expires_at {
            Some(secs) => {
                Some(OffsetDateTime::from_unix_timestamp(secs).map_err(|_| VaultError::Corrupt)?)
            }
            None => None,
        };
        Ok(VaultTokens {
            access_token: SecretString::from(parsed.access_token),
            refresh_token: parsed.refresh_token.map(SecretString::from),
            token_type: parsed.token_type,
            scopes: parsed.scopes,
            expires_at,
        })
    }

    fn key(&self, id: &str) -> Option<&VaultKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
    }
}

/// Associated data: a context tag, then provider, subject and key id, each
/// with a u64 length prefix so that no two different triples encode alike
/// (("ab", "c") vs ("a", "bc")).
fn aad(provider: &str, subject: &str, key_id: &str) -> Vec<u8> {
    let parts = [provider, subject, key_id];
    let mut aad =
        Vec::with_capacity(AAD_CONTEXT.len() + parts.iter().map(|p| 8 + p.len()).sum::<usize>());
    aad.extend_from_slice(AAD_CONTEXT);
    for part in parts {
        aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

/// What `rotate` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Re-sealed with the newest key.
    pub rotated: u64,
    /// Already sealed with the newest key (including rows a concurrent
    /// refresh rewrote while we worked).
    pub already_current: u64,
    /// Sealed with a key that is not configured, or not opening with the
    /// configured one. Left untouched and logged (provider, subject, key id).
    pub undecryptable: u64,
}

/// `authbroker rotate-keys`: re-seals every stored token not sealed with the
/// newest key, walking `list_tokens` pages. Each row is written with
/// compare-and-swap on the version read, so a concurrent refresh is never
/// overwritten: on `Conflict::StaleToken` the row is re-read and retried (a
/// row refreshed by a server that already has the new key is simply
/// current). Rows no configured key opens are counted, never dropped.
/// Idempotent; safe to run beside live servers and to rerun after an error.
pub async fn rotate(store: &dyn Store, vault: &Vault) -> Result<RotationReport, StoreError> {
    rotate_paged(store, vault, ROTATE_PAGE).await
}

async fn rotate_paged(
    store: &dyn Store,
    vault: &Vault,
    page_size: u32,
) -> Result<RotationReport, StoreError> {
    let mut report = RotationReport::default();
    let mut after: Option<(String, String)> = None;
    loop {
        let page = store
            .list_tokens(
                after.as_ref().map(|(p, s)| (p.as_str(), s.as_str())),
                page_size,
            )
            .await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some((last.provider.clone(), last.subject.clone()));
        for row in page {
            rotate_row(
                store,
                vault,
                &row.provider,
                &row.subject,
                row.token,
                &mut report,
            )
            .await?;
        }
    }
    Ok(report)
}

async fn rotate_row(
    store: &dyn Store,
    vault: &Vault,
    provider: &str,
    subject: &str,
    mut token: SealedToken,
    report: &mut RotationReport,
) -> Result<(), StoreError> {
    for _ in 0..ROTATE_ATTEMPTS {
        if vault.is_current(&token) {
            report.already_current += 1;
            return Ok(());
        }
        let tokens = match vault.open(provider, subject, &token) {
            Ok(tokens) => tokens,
            Err(e) => {
                tracing::warn!(
                    provider,
                    subject,
                    key_id = %token.key_id,
                    error = %e,
                    "stored token does not open with any configured key; left as is"
                );
                report.undecryptable += 1;
                return Ok(());
            }
        };
        // A rotation is not a refresh: keep the time the tokens were last
        // written by a login or refresh.
        let resealed = vault
            .seal(provider, subject, &tokens, token.updated_at)
            .map_err(|e| {
                StoreError::Internal(anyhow::Error::new(e).context("re-sealing a token"))
            })?;
        match store
            .put_token(provider, subject, &resealed, Some(token.version))
            .await
        {
            Ok(new_version) => {
                // `put_token` marks the row usable; a token the provider
                // already refused must stay refused. Between the two writes
                // a reader may briefly see it usable and try one refresh,
                // which the provider refuses again: harmless.
                if !token.usable {
                    match store
                        .mark_token_unusable(provider, subject, new_version)
                        .await
                    {
                        // A newer write (a fresh login) won; it is usable by right.
                        Ok(()) | Err(StoreError::Conflict(Conflict::StaleToken)) => {}
                        Err(StoreError::NotFound) => {}
                        Err(e) => return Err(e),
                    }
                }
                report.rotated += 1;
                return Ok(());
            }
            Err(StoreError::Conflict(Conflict::StaleToken)) => {
                match store.get_token(provider, subject).await? {
                    Some(fresh) => token = fresh,
                    // Deleted meanwhile (unlink, user deletion): nothing to rotate.
                    None => return Ok(()),
                }
            }
            // The identity went away meanwhile.
            Err(StoreError::NotFound) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    tracing::warn!(
        provider,
        subject,
        attempts = ROTATE_ATTEMPTS,
        "stored token kept changing during rotation; run rotate-keys again"
    );
    Err(StoreError::Conflict(Conflict::StaleToken))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Identity, now_micros};
    use crate::store::{
        BindPolicy, BindResult, SqliteStore,
        interposed::{Hooks, Interposed},
    };
    use async_trait::async_trait;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use std::sync::Arc;
    use std::sync::Mutex;

    const ACCESS: &str = "gho_AccessTokenValue_0123456789abcdef";
    const REFRESH: &str = "ghr_RefreshTokenValue_fedcba9876543210";

    fn key_b64(byte: u8) -> String {
        STANDARD.encode([byte; KEY_LEN])
    }

    fn inline_key(id: &str, byte: u8) -> VaultKeyConfig {
        VaultKeyConfig {
            id: id.into(),
            key: Some(key_b64(byte).into()),
            key_file: None,
            key_env: None,
        }
    }

    fn vault(keys: &[(&str, u8)]) -> Vault {
        let settings = VaultSettings {
            keys: keys.iter().map(|(id, b)| inline_key(id, *b)).collect(),
            ..Default::default()
        };
        Vault::from_settings(&settings).unwrap().unwrap()
    }

    fn tokens() -> VaultTokens {
        VaultTokens {
            access_token: ACCESS.into(),
            refresh_token: Some(REFRESH.into()),
            token_type: Some("bearer".into()),
            scopes: vec!["read:user".into(), "user:email".into()],
            expires_at: Some(OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap()),
        }
    }

    fn assert_same(a: &VaultTokens, b: &VaultTokens) {
        assert_eq!(
            a.access_token.expose_secret(),
            b.access_token.expose_secret()
        );
        assert_eq!(
            a.refresh_token.as_ref().map(|t| t.expose_secret()),
            b.refresh_token.as_ref().map(|t| t.expose_secret())
        );
        assert_eq!(a.token_type, b.token_type);
        assert_eq!(a.scopes, b.scopes);
        assert_eq!(a.expires_at, b.expires_at);
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn round_trip() {
        let v = vault(&[("k1", 1)]);
        let now = now_micros();
        let sealed = v.seal("github", "42", &tokens(), now).unwrap();
        assert_eq!(sealed.key_id, "k1");
        assert_eq!(sealed.nonce.len(), NONCE_LEN);
        assert_eq!(
            (sealed.version, sealed.usable, sealed.updated_at),
            (0, true, now)
        );
        assert!(!contains(&sealed.ciphertext, ACCESS.as_bytes()));
        assert!(!contains(&sealed.ciphertext, REFRESH.as_bytes()));
        assert!(!contains(&sealed.ciphertext, b"read:user"));
        assert_same(&v.open("github", "42", &sealed).unwrap(), &tokens());

        // Minimal token set: absent optionals come back absent.
        let bare = VaultTokens {
            access_token: "x".into(),
            refresh_token: None,
            token_type: None,
            scopes: Vec::new(),
            expires_at: None,
        };
        let sealed = v.seal("github", "42", &bare, now).unwrap();
        assert_same(&v.open("github", "42", &sealed).unwrap(), &bare);

        // Fresh nonce every time.
        let again = v.seal("github", "42", &bare, now).unwrap();
        assert_ne!(sealed.nonce, again.nonce);
        assert_ne!(sealed.ciphertext, again.ciphertext);
    }

    #[test]
    fn aad_binds_the_row() {
        let v = vault(&[("k1", 1)]);
        let now = now_micros();
        let sealed = v.seal("github", "42", &tokens(), now).unwrap();
        for (p, s) in [
            ("github", "43"),
            ("gitlab", "42"),
            ("github4", "2"),
            ("", "github42"),
        ] {
            assert!(
                matches!(v.open(p, s, &sealed), Err(VaultError::Corrupt)),
                "opened as ({p:?}, {s:?})"
            );
        }
        // Length prefixes: ("ab", "c") and ("a", "bc") differ.
        let ab = v.seal("ab", "c", &tokens(), now).unwrap();
        assert!(matches!(v.open("a", "bc", &ab), Err(VaultError::Corrupt)));

        // Swapping ciphertexts (with their nonces) between two rows fails.
        let other = v.seal("github", "7", &tokens(), now).unwrap();
        let mut swapped = sealed.clone();
        swapped.nonce = other.nonce.clone();
        swapped.ciphertext = other.ciphertext.clone();
        assert!(matches!(
            v.open("github", "42", &swapped),
            Err(VaultError::Corrupt)
        ));
        assert!(v.open("github", "7", &swapped).is_ok());
    }

    #[test]
    fn key_id_is_bound_too() {
        // Same material under two ids: relabelling a row still fails.
        let v = vault(&[("old", 1), ("new", 1)]);
        let mut sealed = v.seal("github", "42", &tokens(), now_micros()).unwrap();
        sealed.key_id = "old".into();
        assert!(matches!(
            v.open("github", "42", &sealed),
            Err(VaultError::Corrupt)
        ));
    }

    #[test]
    fn tampering_is_detected() {
        let v = vault(&[("k1", 1)]);
        let sealed = v.seal("github", "42", &tokens(), now_micros()).unwrap();
        for i in 0..sealed.ciphertext.len() {
            let mut t = sealed.clone();
            t.ciphertext[i] ^= 0x01;
            assert!(matches!(
                v.open("github", "42", &t),
                Err(VaultError::Corrupt)
            ));
        }
        for i in 0..sealed.nonce.len() {
            let mut t = sealed.clone();
            t.nonce[i] ^= 0x80;
            assert!(matches!(
                v.open("github", "42", &t),
                Err(VaultError::Corrupt)
            ));
        }
        let mut short = sealed.clone();
        short.nonce.pop();
        assert!(matches!(
            v.open("github", "42", &short),
            Err(VaultError::Corrupt)
        ));
        let mut truncated = sealed.clone();
        truncated.ciphertext.truncate(10);
        assert!(matches!(
            v.open("github", "42", &truncated),
            Err(VaultError::Corrupt)
        ));
        // Same id, different material (a key replaced instead of rotated).
        let impostor = vault(&[("k1", 2)]);
        assert!(matches!(
            impostor.open("github", "42", &sealed),
            Err(VaultError::Corrupt)
        ));
    }

    #[test]
    fn key_rotation() {
        let a = vault(&[("a", 1)]);
        let sealed = a.seal("github", "42", &tokens(), now_micros()).unwrap();
        assert!(a.is_current(&sealed));

        let ab = vault(&[("a", 1), ("b", 2)]);
        assert_eq!(ab.current_key_id(), "b");
        assert!(!ab.is_current(&sealed));
        let opened = ab.open("github", "42", &sealed).unwrap();
        assert_same(&opened, &tokens());
        let resealed = ab.seal("github", "42", &opened, now_micros()).unwrap();
        assert_eq!(resealed.key_id, "b");
        assert!(ab.is_current(&resealed));

        // Once "a" is retired, its rows are reported, not guessed at.
        let b = vault(&[("b", 2)]);
        assert!(
            matches!(b.open("github", "42", &sealed), Err(VaultError::UnknownKey(id)) if id == "a")
        );
        assert_same(&b.open("github", "42", &resealed).unwrap(), &tokens());
        assert!(format!("{b:?}").contains("\"b\""));
    }

    #[test]
    fn no_keys_means_no_vault() {
        assert!(
            Vault::from_settings(&VaultSettings::default())
                .unwrap()
                .is_none()
        );
        assert!(VaultSettings::default().validate().is_empty());
        assert_eq!(
            VaultSettings::default().refresh_skew,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn key_encodings() {
        // 0xfb encodes to "+/v7" / "-_v7": both alphabets' special characters.
        let bytes = [0xfbu8; KEY_LEN];
        let standard = STANDARD.encode(bytes);
        let url = URL_SAFE_NO_PAD.encode(bytes);
        assert!(standard.contains(['+', '/']) && url.contains(['-', '_']));
        let padded_url = format!("{url}=");
        let unpadded = standard.trim_end_matches('=').to_string();
        let with_newline = format!("{standard}\n");
        let mut sealed_by: Option<SealedToken> = None;
        for text in [&standard, &url, &padded_url, &unpadded, &with_newline] {
            let settings = VaultSettings {
                keys: vec![VaultKeyConfig {
                    id: "k".into(),
                    key: Some(text.as_str().into()),
                    key_file: None,
                    key_env: None,
                }],
                ..Default::default()
            };
            assert!(
                settings.validate().is_empty(),
                "{text:?}: {:?}",
                settings.validate()
            );
            let v = Vault::from_settings(&settings).unwrap().unwrap();
            // Every encoding yields the same key.
            match &sealed_by {
                None => sealed_by = Some(v.seal("p", "s", &tokens(), now_micros()).unwrap()),
                Some(sealed) => assert!(v.open("p", "s", sealed).is_ok()),
            }
        }
    }

    #[test]
    fn validate_lists_every_problem_without_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let good_file = dir.path().join("vault.key");
        std::fs::write(&good_file, format!("{}\n", key_b64(9))).unwrap();
        let short = STANDARD.encode([7u8; 31]);
        let not_b64 = "c2VjcmV0LWtleS1tYXRlcmlhbA!!*";
        let missing_env = format!("AUTHBROKER_TEST_VAULT_MISSING_{}", std::process::id());
        let settings = VaultSettings {
            keys: vec![
                // 0: bad base64
                VaultKeyConfig {
                    key: Some(not_b64.into()),
                    ..inline_key("bad-b64", 0)
                },
                // 1: 31 bytes
                VaultKeyConfig {
                    key: Some(short.as_str().into()),
                    ..inline_key("short", 0)
                },
                // 2: fine
                inline_key("dup", 3),
                // 3: duplicate id
                inline_key("dup", 4),
                // 4: two sources
                VaultKeyConfig {
                    key_env: Some("HOME".into()),
                    ..inline_key("two", 5)
                },
                // 5: missing env var
                VaultKeyConfig {
                    id: "env".into(),
                    key: None,
                    key_file: None,
                    key_env: Some(missing_env.clone()),
                },
                // 6: unreadable file
                VaultKeyConfig {
                    id: "file".into(),
                    key: None,
                    key_file: Some(dir.path().join("absent.key")),
                    key_env: None,
                },
                // 7: no source at all
                VaultKeyConfig {
                    id: "none".into(),
                    key: None,
                    key_file: None,
                    key_env: None,
                },
                // 8: bad id (a key pasted as id); the file source is fine
                VaultKeyConfig {
                    id: key_b64(8),
                    key: None,
                    key_file: Some(good_file.clone()),
                    key_env: None,
                },
                // 9: a key pasted where the variable name goes
                VaultKeyConfig {
                    id: "pasted".into(),
                    key: None,
                    key_file: None,
                    key_env: Some(key_b64(10)),
                },
            ],
            ..Default::default()
        };
        let problems = settings.validate();
        let expect = [
            "vault.keys[0].key: is not valid base64",
            "vault.keys[1].key: must decode to 32 bytes, got 31",
            "vault.keys[3].id: \"dup\" is used twice",
            "vault.keys[4]: set exactly one of key, key_file, key_env (2 set)",
            &format!("vault.keys[5].key_env: environment variable {missing_env:?} is not set"),
            "vault.keys[6].key_file: cannot read",
            "vault.keys[7]: set exactly one of key, key_file, key_env (0 set)",
            "vault.keys[8].id: must be 1-64 characters",
            "vault.keys[9].key_env: holds what looks like a key",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(e)),
                "missing {e:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");

        let all = problems.join("\n");
        for material in [
            not_b64.to_string(),
            short,
            key_b64(3),
            key_b64(4),
            key_b64(5),
            key_b64(8),
            key_b64(9),
            key_b64(10),
        ] {
            assert!(!all.contains(&material), "{material:?} leaked into {all}");
        }
        assert_eq!(
            Vault::from_settings(&settings).unwrap_err(),
            problems,
            "from_settings reports the same list"
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let t = tokens();
        let shown = format!("{t:?}");
        assert!(
            !shown.contains(ACCESS) && !shown.contains(REFRESH),
            "{shown}"
        );
        assert!(shown.contains("bearer"));

        let settings = VaultSettings {
            keys: vec![inline_key("k1", 1)],
            ..Default::default()
        };
        let shown = format!(
            "{settings:?} {:?}",
            Vault::from_settings(&settings).unwrap()
        );
        assert!(!shown.contains(&key_b64(1)), "{shown}");
        assert!(shown.contains("k1"));
        // The inline key is never written back out either.
        let toml = toml::to_string(&settings).unwrap();
        assert!(!toml.contains(&key_b64(1)), "{toml}");
    }

    #[test]
    fn settings_from_toml() {
        let s: VaultSettings = toml::from_str(
            r#"
            refresh_skew = "2m"
            [[keys]]
            id = "2024-01"
            key_env = "VAULT_KEY_2024_01"
            [[keys]]
            id = "2025-01"
            key_file = "/etc/authbroker/vault-2025-01.key"
            "#,
        )
        .unwrap();
        assert_eq!(s.refresh_skew, Duration::from_secs(120));
        assert_eq!(s.keys.len(), 2);
        assert!(toml::from_str::<VaultSettings>("[[keys]]\nid = \"a\"\nkye = \"x\"").is_err());
    }

    // ---- rotate ----

    fn identity(provider: &str, subject: &str) -> Identity {
        Identity {
            provider: provider.into(),
            subject: subject.into(),
            ..Default::default()
        }
    }

    async fn seeded_store(rows: &[(&str, &str)]) -> SqliteStore {
        let store = SqliteStore::open_in_memory().unwrap();
        store.migrate().await.unwrap();
        let policy = BindPolicy {
            create_user: true,
            ..Default::default()
        };
        for (p, s) in rows {
            let r = store
                .bind_login(&identity(p, s), &policy, None, None, now_micros(), None)
                .await
                .unwrap();
            assert!(matches!(r, BindResult::Bound { .. }));
        }
        store
    }

    fn tokens_for(p: &str, s: &str) -> VaultTokens {
        VaultTokens {
            access_token: format!("access-{p}-{s}").into(),
            ..tokens()
        }
    }

    #[tokio::test]
    async fn rotate_reseals_old_rows_and_reports_the_rest() {
        let rows = [
            ("github", "1"),
            ("github", "2"),
            ("github", "3"),
            ("github", "4"),
            ("gitlab", "1"),
        ];
        let store = seeded_store(&rows).await;
        let a = vault(&[("a", 1)]);
        let z = vault(&[("z", 26)]);
        let ab = vault(&[("a", 1), ("b", 2)]);
        let write =
            |v: &Vault, p: &str, s: &str| v.seal(p, s, &tokens_for(p, s), now_micros()).unwrap();
        let mut versions = Vec::new();
        for (p, s) in rows {
            let sealer = match (p, s) {
                ("github", "3") => &z,  // no configured key opens it
                ("github", "4") => &ab, // already current
                _ => &a,
            };
            versions.push(
                store
                    .put_token(p, s, &write(sealer, p, s), None)
                    .await
                    .unwrap(),
            );
        }
        // ("github", "2") was refused by the provider.
        store
            .mark_token_unusable("github", "2", versions[1])
            .await
            .unwrap();
        let z_row = store.get_token("github", "3").await.unwrap().unwrap();

        // Page size 2 walks three pages.
        let report = rotate_paged(&store, &ab, 2).await.unwrap();
        assert_eq!(
            report,
            RotationReport {
                rotated: 3,
                already_current: 1,
                undecryptable: 1
            }
        );
        for (p, s) in rows {
            let row = store.get_token(p, s).await.unwrap().unwrap();
            if (p, s) == ("github", "3") {
                assert_eq!(row, z_row, "undecryptable rows are left untouched");
                continue;
            }
            assert_eq!(row.key_id, "b", "{p}/{s}");
            assert_eq!(row.usable, (p, s) != ("github", "2"), "{p}/{s}");
            assert_same(&ab.open(p, s, &row).unwrap(), &tokens_for(p, s));
        }

        // Rerunning finds nothing to do.
        let again = rotate(&store, &ab).await.unwrap();
        assert_eq!(
            again,
            RotationReport {
                rotated: 0,
                already_current: 4,
                undecryptable: 1
            }
        );
        // An empty store is fine.
        let empty = seeded_store(&[]).await;
        assert_eq!(
            rotate(&empty, &ab).await.unwrap(),
            RotationReport::default()
        );
    }

    /// The "concurrent refresh" `racing_store` makes before one write.
    struct Racing {
        race: Mutex<Option<(String, String, SealedToken)>>,
    }

    #[async_trait]
    impl Hooks for Racing {
        async fn before_put_token(
            &self,
            store: &dyn Store,
            p: &str,
            s: &str,
            expected_version: Option<i64>,
        ) -> Result<(), StoreError> {
            let racer = {
                let mut race = self.race.lock().unwrap();
                match race.as_ref() {
                    Some((rp, rs, _)) if expected_version.is_some() && rp == p && rs == s => {
                        race.take().map(|(_, _, t)| t)
                    }
                    _ => None,
                }
            };
            if let Some(racer) = racer {
                store.put_token(p, s, &racer, None).await?;
            }
            Ok(())
        }
    }

    /// SQLite, where the first compare-and-swap write to github/1 is
    /// preceded by a "concurrent refresh" that rewrites the row with `racer`.
    fn racing_store(inner: SqliteStore, racer: SealedToken) -> Interposed {
        let race = Mutex::new(Some(("github".into(), "1".into(), racer)));
        Interposed::new(Arc::new(inner), Arc::new(Racing { race }))
    }

    #[tokio::test]
    async fn rotate_never_overwrites_a_concurrent_refresh() {
        let a = vault(&[("a", 1)]);
        let ab = vault(&[("a", 1), ("b", 2)]);
        let refreshed = VaultTokens {
            access_token: "access-after-refresh".into(),
            ..tokens()
        };

        // A server still on the old key set refreshes the row mid-rotation:
        // rotate re-reads it and re-seals the refreshed tokens.
        let store = racing_store(
            seeded_store(&[("github", "1")]).await,
            a.seal("github", "1", &refreshed, now_micros()).unwrap(),
        );
        store
            .put_token(
                "github",
                "1",
                &a.seal("github", "1", &tokens(), now_micros()).unwrap(),
                None,
            )
            .await
            .unwrap();
        let report = rotate(&store, &ab).await.unwrap();
        assert_eq!(
            report,
            RotationReport {
                rotated: 1,
                ..Default::default()
            }
        );
        let row = store.get_token("github", "1").await.unwrap().unwrap();
        assert_eq!(row.key_id, "b");
        assert_same(&ab.open("github", "1", &row).unwrap(), &refreshed);

        // A server that already has the new key refreshes it: simply current.
        let store = racing_store(
            seeded_store(&[("github", "1")]).await,
            ab.seal("github", "1", &refreshed, now_micros()).unwrap(),
        );
        store
            .put_token(
                "github",
                "1",
                &a.seal("github", "1", &tokens(), now_micros()).unwrap(),
                None,
            )
            .await
            .unwrap();
        let report = rotate(&store, &ab).await.unwrap();
        assert_eq!(
            report,
            RotationReport {
                already_current: 1,
                ..Default::default()
            }
        );
        let row = store.get_token("github", "1").await.unwrap().unwrap();
        assert_same(&ab.open("github", "1", &row).unwrap(), &refreshed);
    }
}
