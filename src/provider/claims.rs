//! Where an OpenID Connect preset reads its identity from when OIDC's
//! defaults (`sub`, `email_verified`, `name`) do not fit the provider: a
//! subject made of several claims (Entra's `tid` and `oid`), another claim
//! vouching for the email (Entra's `xms_edov`), and display-name fallbacks
//! from the callback (Apple's first-login `user` form field). Templates are
//! the spec's own (`{id_token:/oid}`), read from the login's documents.

use serde::Deserialize;
use serde_json::Value;

use super::{
    body,
    spec::{Part, Template},
};

/// Longer than any provider's real user id; a longer one is refused.
const MAX_SUBJECT: usize = 255;
const MAX_DISPLAY_NAME: usize = 512;

/// A preset's `[claims]` table; every field has OIDC's default.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimMapping {
    /// The stable subject; default `{id_token:/sub}`. Every field it names
    /// must be present.
    pub subject: Option<Template>,
    /// The claim, beside `email` in the same document, that says the email
    /// is verified; default `email_verified`.
    pub email_verified: String,
    /// Display names to fall back on, in order, when neither userinfo nor
    /// the ID token has a `name`; the first whose fields are all present
    /// (and is not blank) wins.
    pub display_name: Vec<Template>,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        ClaimMapping {
            subject: None,
            email_verified: "email_verified".into(),
            display_name: Vec::new(),
        }
    }
}

/// Why a mapping cannot be applied to a login.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("a claim of the subject ({0}) is missing")]
    MissingSubjectClaim(String),
    #[error("the subject is implausibly long")]
    SubjectTooLong,
}

/// `template` filled from the documents; `None` if a field is missing or
/// not a scalar.
fn render<'a>(
    template: &Template,
    get: &impl Fn(&str, &str) -> Option<&'a Value>,
) -> Option<String> {
    let mut out = String::new();
    for part in &template.0 {
        match part {
            Part::Literal(s) => out.push_str(s),
            Part::Field(f) => out.push_str(body::scalar_string(get(&f.doc, &f.pointer)?)?.trim()),
            // A client id has no place in an identity.
            Part::ClientId => return None,
        }
    }
    Some(out)
}

impl ClaimMapping {
    /// The subject the template makes, when there is one.
    pub fn subject<'a>(
        &self,
        get: impl Fn(&str, &str) -> Option<&'a Value>,
    ) -> Option<Result<String, ClaimError>> {
        let template = self.subject.as_ref()?;
        let missing = template.0.iter().find_map(|p| match p {
            Part::Field(f)
                if get(&f.doc, &f.pointer)
                    .and_then(body::scalar_string)
                    .is_none() =>
            {
                Some(f.to_string())
            }
            _ => None,
        });
        Some(match (missing, render(template, &get)) {
            (Some(field), _) => Err(ClaimError::MissingSubjectClaim(field)),
            (None, Some(s)) if s.len() > MAX_SUBJECT => Err(ClaimError::SubjectTooLong),
            (None, Some(s)) => Ok(s),
            (None, None) => Err(ClaimError::MissingSubjectClaim(String::new())),
        })
    }

    /// The first display-name fallback whose fields are all there.
    pub fn display_name<'a>(
        &self,
        get: impl Fn(&str, &str) -> Option<&'a Value>,
    ) -> Option<String> {
        self.display_name
            .iter()
            .filter_map(|t| render(t, &get))
            .map(|s| s.trim().to_string())
            .find(|s| !s.is_empty() && s.len() <= MAX_DISPLAY_NAME)
    }

    /// Every document a template names, for the preset's own check.
    pub fn documents(&self) -> impl Iterator<Item = &str> {
        self.subject
            .iter()
            .chain(&self.display_name)
            .flat_map(|t| t.0.iter())
            .filter_map(|p| match p {
                Part::Field(f) => Some(f.doc.as_str()),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping(text: &str) -> ClaimMapping {
        toml::from_str(text).unwrap()
    }

    fn docs(id_token: Value, callback: Value) -> impl Fn(&str, &str) -> Option<&'static Value> {
        let leaked: &'static [(&str, Value)] =
            Box::leak(Box::new([("id_token", id_token), ("callback", callback)]));
        move |doc, at| {
            leaked
                .iter()
                .find(|(name, _)| *name == doc)
                .and_then(|(_, v)| v.pointer(at))
                .filter(|v| !v.is_null())
        }
    }

    #[test]
    fn defaults_are_oidc_s() {
        let m = ClaimMapping::default();
        assert!(m.subject(docs(json!({"sub": "x"}), json!({}))).is_none());
        assert_eq!(m.email_verified, "email_verified");
        assert_eq!(m.display_name(docs(json!({}), json!({}))), None);
        assert_eq!(m.documents().count(), 0);
    }

    #[test]
    fn a_subject_of_two_claims_needs_both() {
        let m = mapping(r#"subject = "{id_token:/tid}:{id_token:/oid}""#);
        let both = docs(json!({"tid": "t-1", "oid": "o-2", "sub": "s"}), json!({}));
        assert_eq!(m.subject(both), Some(Ok("t-1:o-2".into())));
        let one = docs(json!({"tid": "t-1", "sub": "s"}), json!({}));
        assert_eq!(
            m.subject(one),
            Some(Err(ClaimError::MissingSubjectClaim("id_token:/oid".into())))
        );
        let long = docs(json!({"tid": "t".repeat(300), "oid": "o"}), json!({}));
        assert_eq!(m.subject(long), Some(Err(ClaimError::SubjectTooLong)));
        assert_eq!(m.documents().collect::<Vec<_>>(), ["id_token", "id_token"]);
    }

    #[test]
    fn the_first_complete_display_name_wins() {
        let m = mapping(
            r#"display_name = [
                "{callback:/user/name/firstName} {callback:/user/name/lastName}",
                "{callback:/user/name/firstName}",
            ]"#,
        );
        let full = json!({"user": {"name": {"firstName": "Ada", "lastName": "Lovelace"}}});
        assert_eq!(
            m.display_name(docs(json!({}), full)),
            Some("Ada Lovelace".into())
        );
        let first = json!({"user": {"name": {"firstName": " Ada "}}});
        assert_eq!(m.display_name(docs(json!({}), first)), Some("Ada".into()));
        let blank = json!({"user": {"name": {"firstName": "  "}}});
        assert_eq!(m.display_name(docs(json!({}), blank)), None);
        assert_eq!(m.display_name(docs(json!({}), json!({}))), None);
    }
}
