//! Signed calls, for providers whose gateway authenticates every request by
//! a signature over its parameters instead of a client secret, and signs
//! its answers in turn (Alipay's RSA2, docs/providers.md#alipay). One job:
//! add the signature to a request's parameters, and check an answer's.
//!
//! What is signed is the request's parameters sorted by name and joined as
//! `name=value&…`, raw (not URL-encoded), without the signature parameter
//! and without empty values; what is checked is the exact JSON text of one
//! top-level member of the answer, against a signature in another. The
//! spec says which names, so the engine never asks which provider it runs.

use std::{collections::BTreeMap, fmt};

use base64::{Engine, engine::general_purpose::STANDARD};
use rsa::{
    RsaPrivateKey, RsaPublicKey,
    pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey},
    pkcs1v15::{Signature, SigningKey, VerifyingKey},
    pkcs8::{DecodePrivateKey, DecodePublicKey},
    signature::{SignatureEncoding, Signer as _, Verifier as _},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use time::{OffsetDateTime, UtcOffset, format_description::OwnedFormatItem};

/// `[signing]` in a spec.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningSpec {
    pub algorithm: SignAlgorithm,
    /// The parameter the base64 signature travels in; never itself signed.
    #[serde(default = "sign")]
    pub param: String,
    /// Fixed parameters every signed request carries (and signs).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// A parameter holding the time of the request, which the gateway
    /// checks against its clock.
    #[serde(default)]
    pub timestamp: Option<TimestampSpec>,
    /// How the provider signs its answers; absent, they are not checked.
    #[serde(default)]
    pub answers: Option<AnswerSigning>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 §8.2), base64-encoded:
    /// what Alipay calls `RSA2`.
    RsaSha256,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestampSpec {
    pub param: String,
    /// A `time` format description:
    /// `[year]-[month]-[day] [hour]:[minute]:[second]`.
    pub format: String,
    /// The zone the time is written in, `+HH:MM`.
    #[serde(default = "utc")]
    pub utc_offset: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerSigning {
    /// The top-level member holding the base64 signature.
    #[serde(default = "sign")]
    pub signature: String,
    /// Top-level members whose exact JSON text is signed; the first one
    /// present is the one checked.
    pub members: Vec<String>,
}

fn sign() -> String {
    "sign".into()
}

fn utc() -> String {
    "+00:00".into()
}

impl SigningSpec {
    /// Problems with the section itself, for `ProviderSpec::check`.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(t) = &self.timestamp {
            if let Err(e) = time::format_description::parse_owned::<2>(&t.format) {
                problems.push(format!("signing.timestamp.format: {e}"));
            }
            if let Err(e) = parse_offset(&t.utc_offset) {
                problems.push(format!("signing.timestamp.utc_offset: {e}"));
            }
        }
        if let Some(a) = &self.answers
            && a.members.is_empty()
        {
            problems.push("signing.answers.members: name at least one signed member".into());
        }
        problems
    }
}

/// `+HH:MM` or `-HH:MM`.
fn parse_offset(s: &str) -> Result<UtcOffset, String> {
    let bad = || format!("{s:?} is not +HH:MM or -HH:MM");
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let h: i8 = h.parse().map_err(|_| bad())?;
    let m: i8 = m.parse().map_err(|_| bad())?;
    UtcOffset::from_hms(sign * h, sign * m, 0).map_err(|_| bad())
}

/// What is signed: the parameters sorted by name, `name=value` joined by
/// `&`, raw, leaving out `exclude` (the signature) and empty values.
pub fn content(params: &[(String, String)], exclude: &str) -> String {
    let mut kept: Vec<&(String, String)> = params
        .iter()
        .filter(|(k, v)| k != exclude && !k.is_empty() && !v.is_empty())
        .collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    for (k, v) in kept {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Signs a provider's requests with the client's private key and checks
/// its answers with the provider's public key. No `Debug` of either key.
#[derive(Clone)]
pub struct Signer {
    spec: SigningSpec,
    key: SigningKey<Sha256>,
    provider_key: Option<VerifyingKey<Sha256>>,
    timestamp: Option<(String, OwnedFormatItem, UtcOffset)>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("algorithm", &self.spec.algorithm)
            .field("checks_answers", &self.provider_key.is_some())
            .finish_non_exhaustive()
    }
}

/// Why the keys cannot be used; names the key, never shows it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is not an RSA private key (PEM PKCS#8 or PKCS#1, or the bare base64 of either's DER)")]
    Private,
    #[error(
        "is not an RSA public key (PEM SubjectPublicKeyInfo or PKCS#1, or the bare base64 of either's DER)"
    )]
    Public,
    #[error("is required: this provider signs its answers and they are checked with it")]
    PublicMissing,
    #[error("{0}")]
    Spec(String),
}

impl Signer {
    /// `private_key` is the client's; `provider_key` the provider's public
    /// key, which a spec whose answers are signed requires.
    pub fn new(
        spec: SigningSpec,
        private_key: &SecretString,
        provider_key: Option<&str>,
    ) -> Result<Signer, KeyError> {
        let key = private_key_of(private_key.expose_secret()).ok_or(KeyError::Private)?;
        let provider_key = match (provider_key, &spec.answers) {
            (Some(text), _) => Some(public_key_of(text).ok_or(KeyError::Public)?),
            (None, Some(_)) => return Err(KeyError::PublicMissing),
            (None, None) => None,
        };
        let timestamp = match &spec.timestamp {
            Some(t) => Some((
                t.param.clone(),
                time::format_description::parse_owned::<2>(&t.format)
                    .map_err(|e| KeyError::Spec(e.to_string()))?,
                parse_offset(&t.utc_offset).map_err(KeyError::Spec)?,
            )),
            None => None,
        };
        Ok(Signer {
            spec,
            key: SigningKey::new(key),
            provider_key: provider_key.map(VerifyingKey::new),
            timestamp,
        })
    }

    /// Adds the fixed parameters and the timestamp to `params`, then the
    /// signature over all of them.
    pub fn sign(&self, params: &mut Vec<(String, String)>) -> Result<(), String> {
        params.extend(self.spec.params.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some((name, format, offset)) = &self.timestamp {
            let now = OffsetDateTime::now_utc()
                .to_offset(*offset)
                .format(format)
                .map_err(|e| format!("the request time cannot be written: {e}"))?;
            params.push((name.clone(), now));
        }
        let signed = content(params, &self.spec.param);
        let signature = self.key.sign(signed.as_bytes());
        params.push((
            self.spec.param.clone(),
            STANDARD.encode(signature.to_bytes()),
        ));
        Ok(())
    }

    /// Checks an answer's signature. A success must carry a good one; a
    /// refusal (`is_error`) may come unsigned, and is a refusal either way,
    /// but a signature it does carry must verify. `Err` says what is wrong.
    pub fn check_answer(&self, body: &[u8], is_error: bool) -> Result<(), String> {
        let (Some(answers), Some(key)) = (&self.spec.answers, &self.provider_key) else {
            return Ok(());
        };
        let members: BTreeMap<String, &RawValue> = match serde_json::from_slice(body) {
            Ok(m) => m,
            Err(_) if is_error => return Ok(()),
            Err(_) => return Err("the answer is not a JSON object, so not signed".into()),
        };
        let signed = answers
            .members
            .iter()
            .find_map(|name| members.get(name.as_str()));
        let signature = members
            .get(answers.signature.as_str())
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
        let (signed, signature) = match (signed, signature) {
            (Some(signed), Some(signature)) => (signed, signature),
            _ if is_error => return Ok(()),
            (None, _) => return Err("the answer has no signed member".into()),
            (Some(_), None) => return Err("the answer is not signed".into()),
        };
        let bytes = STANDARD
            .decode(signature.trim())
            .map_err(|_| "the answer's signature is not base64".to_string())?;
        let signature = Signature::try_from(bytes.as_slice())
            .map_err(|_| "the answer's signature is malformed".to_string())?;
        key.verify(signed.get().as_bytes(), &signature)
            .map_err(|_| "the answer's signature does not verify with the provider's key".into())
    }
}

/// PEM (PKCS#8 or PKCS#1), or the bare base64 DER that Alipay's key tool
/// and console show.
fn private_key_of(text: &str) -> Option<RsaPrivateKey> {
    let text = text.trim();
    if text.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
        return RsaPrivateKey::from_pkcs1_pem(text).ok();
    }
    if text.starts_with("-----BEGIN") {
        return RsaPrivateKey::from_pkcs8_pem(text).ok();
    }
    let der = bare_base64(text)?;
    RsaPrivateKey::from_pkcs8_der(&der)
        .or_else(|_| RsaPrivateKey::from_pkcs1_der(&der))
        .ok()
}

fn public_key_of(text: &str) -> Option<RsaPublicKey> {
    let text = text.trim();
    if text.starts_with("-----BEGIN RSA PUBLIC KEY-----") {
        return RsaPublicKey::from_pkcs1_pem(text).ok();
    }
    if text.starts_with("-----BEGIN") {
        return RsaPublicKey::from_public_key_pem(text).ok();
    }
    let der = bare_base64(text)?;
    RsaPublicKey::from_public_key_der(&der)
        .or_else(|_| RsaPublicKey::from_pkcs1_der(&der))
        .ok()
}

fn bare_base64(text: &str) -> Option<Vec<u8>> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD.decode(compact).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::{
        pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey},
        pkcs8::{EncodePublicKey, LineEnding},
    };

    const APP_KEY: &str = include_str!("../../tests/support/keys/rsa.pem");
    const PROVIDER_KEY: &str = include_str!("../../tests/support/keys/rsa_rotated.pem");

    fn spec() -> SigningSpec {
        toml::from_str(
            r#"
            algorithm = "rsa_sha256"
            params = { charset = "utf-8", sign_type = "RSA2", version = "1.0" }
            timestamp = { param = "timestamp", format = "[year]-[month]-[day] [hour]:[minute]:[second]", utc_offset = "+08:00" }
            answers = { members = ["m_response", "error_response"] }
            "#,
        )
        .unwrap()
    }

    fn public_pem(private: &str) -> String {
        RsaPublicKey::from(private_key_of(private).unwrap())
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    fn signer() -> Signer {
        Signer::new(
            spec(),
            &SecretString::from(APP_KEY),
            Some(&public_pem(PROVIDER_KEY)),
        )
        .unwrap()
    }

    /// What the provider does: sign a member's text with its own key.
    fn signed_answer(member: &str, text: &str) -> String {
        let key = SigningKey::<Sha256>::new(private_key_of(PROVIDER_KEY).unwrap());
        let sig = STANDARD.encode(key.sign(text.as_bytes()).to_bytes());
        format!("{{\"{member}\":{text},\"sign\":\"{sig}\"}}")
    }

    #[test]
    fn content_is_sorted_raw_and_leaves_out_the_signature_and_empty_values() {
        let params = [
            ("method", "a.b.c"),
            ("app_id", "2021"),
            ("sign", "xyz"),
            ("biz_content", ""),
            ("timestamp", "2026-12-03 22:10:00"),
            ("redirect", "https://x/?a=1&b=é"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(
            content(&params, "sign"),
            "app_id=2021&method=a.b.c&redirect=https://x/?a=1&b=é&timestamp=2026-12-03 22:10:00"
        );
    }

    #[test]
    fn a_signed_request_verifies_with_the_clients_public_key() {
        let mut params = vec![("app_id".to_string(), "2021".to_string())];
        signer().sign(&mut params).unwrap();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("sign_type"), "RSA2");
        let ts = get("timestamp");
        assert!(
            time::PrimitiveDateTime::parse(
                &ts,
                &time::format_description::parse_borrowed::<2>(
                    "[year]-[month]-[day] [hour]:[minute]:[second]"
                )
                .unwrap()
            )
            .is_ok(),
            "{ts}"
        );
        let public = VerifyingKey::<Sha256>::new(public_key_of(&public_pem(APP_KEY)).unwrap());
        let sig = Signature::try_from(STANDARD.decode(get("sign")).unwrap().as_slice()).unwrap();
        public
            .verify(content(&params, "sign").as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn the_timestamp_is_written_in_the_configured_zone() {
        let mut params = Vec::new();
        signer().sign(&mut params).unwrap();
        let ts = &params.iter().find(|(k, _)| k == "timestamp").unwrap().1;
        let china = OffsetDateTime::now_utc().to_offset(UtcOffset::from_hms(8, 0, 0).unwrap());
        assert!(ts.starts_with(&format!("{}-", china.year())), "{ts}");
        let hour: u8 = ts[11..13].parse().unwrap();
        // The hour may have turned between the two readings.
        assert!(
            hour == china.hour() || hour == (china.hour() + 1) % 24,
            "{ts}"
        );
    }

    #[test]
    fn answers_are_checked_over_the_exact_member_text() {
        let s = signer();
        let good = signed_answer("m_response", r#"{"code":"10000", "nick":"小明"}"#);
        s.check_answer(good.as_bytes(), false).unwrap();
        // The same member re-serialised (a space dropped) no longer verifies.
        let tampered = good.replace("\"10000\", ", "\"10000\",");
        assert!(s.check_answer(tampered.as_bytes(), false).is_err());
        let err = signed_answer(
            "error_response",
            r#"{"code":"40002","sub_code":"isv.code-invalid"}"#,
        );
        s.check_answer(err.as_bytes(), true).unwrap();
        // An unsigned refusal is still a refusal; an unsigned success is not trusted.
        s.check_answer(br#"{"error_response":{"code":"40002"}}"#, true)
            .unwrap();
        assert!(
            s.check_answer(br#"{"m_response":{"code":"10000"}}"#, false)
                .is_err()
        );
        assert!(s.check_answer(b"<html>", false).is_err());
        // Signed by someone else's key.
        let other = Signer::new(
            spec(),
            &SecretString::from(APP_KEY),
            Some(&public_pem(APP_KEY)),
        )
        .unwrap();
        assert!(other.check_answer(good.as_bytes(), false).is_err());
        // A refusal whose signature fails is not trusted either.
        let forged = err.replace("40002", "40003");
        assert!(s.check_answer(forged.as_bytes(), true).is_err());
    }

    #[test]
    fn keys_come_as_pem_of_either_standard_or_bare_base64() {
        let key = private_key_of(APP_KEY).unwrap();
        let pkcs1 = key.to_pkcs1_pem(LineEnding::LF).unwrap();
        assert!(private_key_of(&pkcs1).is_some());
        let bare: String = APP_KEY
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(private_key_of(&bare).is_some());
        let public = RsaPublicKey::from(&key);
        assert!(public_key_of(&public.to_pkcs1_pem(LineEnding::LF).unwrap()).is_some());
        let spki = public.to_public_key_pem(LineEnding::LF).unwrap();
        let bare: String = spki.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(public_key_of(&bare).is_some());
        assert_eq!(
            Signer::new(spec(), &SecretString::from("not a key"), None).unwrap_err(),
            KeyError::Private
        );
        assert_eq!(
            Signer::new(spec(), &SecretString::from(APP_KEY), None).unwrap_err(),
            KeyError::PublicMissing
        );
        assert_eq!(
            Signer::new(spec(), &SecretString::from(APP_KEY), Some("nope")).unwrap_err(),
            KeyError::Public
        );
    }

    #[test]
    fn spec_check_finds_bad_formats() {
        let mut s = spec();
        s.timestamp.as_mut().unwrap().format = "[nonsense".into();
        s.timestamp.as_mut().unwrap().utc_offset = "8".into();
        s.answers.as_mut().unwrap().members.clear();
        assert_eq!(s.check().len(), 3, "{:?}", s.check());
        assert!(spec().check().is_empty());
    }
}
