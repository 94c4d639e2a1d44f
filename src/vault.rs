//! Provider tokens sealed at rest: XChaCha20-Poly1305 under a ring of keys
//! (read from `[vault]` by `config::VaultSettings`). The newest key seals,
//! every key opens, so keys rotate without downtime: add a key, restart, run
//! `authbroker rotate-keys` (`tokens::rotation`), then retire the old key.
//! The store only ever sees [`SealedToken`]; this module never sees the store.
//!
//! Why XChaCha20-Poly1305: its 192-bit nonces can be drawn at random for
//! every seal with no counter to keep and no birthday risk at any volume
//! (96-bit AES-GCM nonces would need care past ~2^32 seals per key), and it
//! is constant-time in software on every CPU.
//!
//! The AAD binds each ciphertext to its identity row (provider, subject) and
//! to its key id, so a row copied or moved onto another identity, or
//! relabelled with another key id, fails to open.

use std::{fmt, io};

use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload, rand_core::OsRng, rand_core::RngCore},
};
use secrecy::{ExposeSecret, SecretString, zeroize::Zeroizing};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::{KeyMaterial, VaultSettings};
use crate::domain::SealedToken;

/// Bytes in an XChaCha20 nonce.
const NONCE_LEN: usize = 24;
/// Domain separation for the AAD; a new plaintext or AAD layout gets a new
/// tag, so old and new ciphertexts can never be confused.
const AAD_CONTEXT: &[u8] = b"authbroker/vault/v1\0";

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
        settings.load_keys().map(Vault::from_keys)
    }

    /// The ring of `keys`, oldest first: the last one seals. `None` when
    /// there are none.
    pub fn from_keys(keys: Vec<KeyMaterial>) -> Option<Vault> {
        let mut ring: Vec<VaultKey> = keys
            .into_iter()
            .map(|k| VaultKey {
                // The cipher keeps its own copy of the key and zeroizes it
                // on drop; `k.bytes` is zeroized as it drops here.
                cipher: XChaCha20Poly1305::new((&*k.bytes).into()),
                id: k.id,
            })
            .collect();
        ring.pop().map(|current| Vault {
            current,
            previous: ring,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{VAULT_KEY_LEN, VaultKeyConfig};
    use crate::domain::now_micros;

    const ACCESS: &str = "gho_AccessTokenValue_0123456789abcdef";
    const REFRESH: &str = "ghr_RefreshTokenValue_fedcba9876543210";

    fn key(id: &str, byte: u8) -> KeyMaterial {
        KeyMaterial {
            id: id.into(),
            bytes: Zeroizing::new([byte; VAULT_KEY_LEN]),
        }
    }

    /// A ring of `(id, every byte of the key)`, oldest first.
    fn vault(keys: &[(&str, u8)]) -> Vault {
        Vault::from_keys(keys.iter().map(|(id, b)| key(id, *b)).collect()).unwrap()
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
        assert!(Vault::from_keys(Vec::new()).is_none());
        assert!(
            Vault::from_settings(&VaultSettings::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn settings_make_the_ring_or_list_the_problems() {
        let inline = |id: &str, key: String| VaultKeyConfig {
            id: id.into(),
            key: Some(key.into()),
            key_file: None,
            key_env: None,
        };
        let b64 = |byte: u8| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode([byte; VAULT_KEY_LEN])
        };
        let settings = VaultSettings {
            keys: vec![inline("a", b64(1)), inline("b", b64(2))],
            ..Default::default()
        };
        let from_settings = Vault::from_settings(&settings).unwrap().unwrap();
        assert_eq!(from_settings.current_key_id(), "b");
        let sealed = vault(&[("a", 1)])
            .seal("p", "s", &tokens(), now_micros())
            .unwrap();
        assert_same(&from_settings.open("p", "s", &sealed).unwrap(), &tokens());

        let broken = VaultSettings {
            keys: vec![inline("a", "short".into())],
            ..Default::default()
        };
        assert_eq!(
            Vault::from_settings(&broken).unwrap_err(),
            broken.validate(),
            "from_settings reports what validate lists"
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

        let shown = format!("{:?}", vault(&[("k1", 0x41)]));
        assert!(!shown.contains("AAAA") && !shown.contains("65"), "{shown}");
        assert!(shown.contains("k1"));
    }
}
