//! `[vault]`: the token vault's keys as configured, and the reading of
//! them: inline, from a file or from an environment variable, base64, with
//! every problem reported at once and no key material in any message. What
//! comes out is [`KeyMaterial`], which `vault` turns into its key ring.

use std::{path::PathBuf, time::Duration};

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use secrecy::{ExposeSecret, SecretString, zeroize::Zeroizing};
use serde::{Deserialize, Serialize};

/// Bytes in a key, base64-decoded: what XChaCha20-Poly1305 takes.
pub const VAULT_KEY_LEN: usize = 32;

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

/// One configured key, read and decoded. Not `Debug`: nothing may print
/// it; the bytes are zeroized on drop.
pub struct KeyMaterial {
    /// Stored next to each ciphertext it seals.
    pub id: String,
    pub bytes: Zeroizing<[u8; VAULT_KEY_LEN]>,
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

    /// Every configured key, oldest first, or every problem (as
    /// [`validate`](Self::validate) lists them).
    pub fn load_keys(&self) -> Result<Vec<KeyMaterial>, Vec<String>> {
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
            if let Some(bytes) = load_key(i, entry, &mut problems)
                && id_ok
            {
                keys.push(KeyMaterial {
                    id: entry.id.clone(),
                    bytes,
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
) -> Option<Zeroizing<[u8; VAULT_KEY_LEN]>> {
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
                "vault.keys[{i}].{field}: must decode to {VAULT_KEY_LEN} bytes, got {n}"
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
/// ignored. Every copy of the decoded bytes is zeroized when dropped.
fn decode_key(text: &str) -> Result<Zeroizing<[u8; VAULT_KEY_LEN]>, KeyProblem> {
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
    if bytes.len() != VAULT_KEY_LEN {
        return Err(KeyProblem::Length(bytes.len()));
    }
    let mut key = Zeroizing::new([0u8; VAULT_KEY_LEN]);
    key.copy_from_slice(&bytes);
    Ok(key)
}

fn valid_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    fn key_b64(byte: u8) -> String {
        STANDARD.encode([byte; VAULT_KEY_LEN])
    }

    fn inline_key(id: &str, byte: u8) -> VaultKeyConfig {
        VaultKeyConfig {
            id: id.into(),
            key: Some(key_b64(byte).into()),
            key_file: None,
            key_env: None,
        }
    }

    #[test]
    fn no_keys_by_default() {
        let settings = VaultSettings::default();
        assert!(settings.validate().is_empty());
        assert!(settings.load_keys().unwrap().is_empty());
        assert_eq!(settings.refresh_skew, Duration::from_secs(60));
    }

    #[test]
    fn keys_load_oldest_first() {
        let settings = VaultSettings {
            keys: vec![inline_key("a", 1), inline_key("b", 2)],
            ..Default::default()
        };
        let keys = settings.load_keys().unwrap();
        let ids: Vec<_> = keys.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(*keys[1].bytes, [2u8; VAULT_KEY_LEN]);
    }

    #[test]
    fn key_encodings() {
        // 0xfb encodes to "+/v7" / "-_v7": both alphabets' special characters.
        let bytes = [0xfbu8; VAULT_KEY_LEN];
        let standard = STANDARD.encode(bytes);
        let url = URL_SAFE_NO_PAD.encode(bytes);
        assert!(standard.contains(['+', '/']) && url.contains(['-', '_']));
        let padded_url = format!("{url}=");
        let unpadded = standard.trim_end_matches('=').to_string();
        let with_newline = format!("{standard}\n");
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
            // Every encoding yields the same key.
            let keys = settings.load_keys().unwrap();
            assert_eq!(*keys[0].bytes, bytes, "{text:?}");
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
            settings.load_keys().err(),
            Some(problems),
            "load_keys reports the same list"
        );
    }

    #[test]
    fn inline_keys_are_never_shown() {
        let settings = VaultSettings {
            keys: vec![inline_key("k1", 1)],
            ..Default::default()
        };
        let shown = format!("{settings:?}");
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
}
