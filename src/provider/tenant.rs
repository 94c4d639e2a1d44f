//! Multi-tenant issuers: one authorization server speaking for many
//! tenants, each its own issuer (`https://idp.example/{tenant}/v2.0`). The
//! discovery document of a multi-tenant endpoint names its issuer as a
//! template with a placeholder where the tenant goes, and each ID token
//! says in a claim which tenant issued it. An ID token is accepted only if
//! its `iss` is that template with the placeholder replaced by the token's
//! own tenant claim, which is what stops one tenant's token passing for
//! another's. Microsoft Entra is the case in point
//! (docs/providers.md#microsoft).

use serde::Deserialize;
use serde_json::Value;

/// A preset's `[tenant_issuer]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantIssuer {
    /// What stands for the tenant in discovery's issuer (`{tenantid}`).
    pub placeholder: String,
    /// The ID-token claim naming the issuing tenant (`tid`).
    pub claim: String,
}

/// A tenant id as it may appear in a URL path: one segment, no dots that
/// could walk the path, nothing that needs escaping.
fn plausible_tenant(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl TenantIssuer {
    /// Whether `discovered`, the issuer a discovery document names, may stand
    /// for `configured`, the issuer it was fetched from (OIDC Discovery
    /// §4.3 wants them equal). Equal is fine; so is the same URL with one
    /// path segment replaced by the placeholder (a multi-tenant endpoint
    /// such as `common`) or by a tenant id (an alias such as `consumers`,
    /// whose discovery names the tenant it stands for). Host, scheme and
    /// every other segment must match.
    pub fn accepts_discovery(&self, configured: &str, discovered: &str) -> bool {
        let configured = configured.trim_end_matches('/');
        let discovered = discovered.trim_end_matches('/');
        if configured == discovered {
            return true;
        }
        let ours: Vec<&str> = configured.split('/').collect();
        let theirs: Vec<&str> = discovered.split('/').collect();
        if ours.len() != theirs.len() || ours.len() < 4 {
            return false;
        }
        let differing: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
        // Segments 0-2 are the scheme, "" and the host.
        match differing[..] {
            [i] if i >= 3 => theirs[i] == self.placeholder || plausible_tenant(theirs[i]),
            _ => false,
        }
    }

    /// The `iss` an ID token must carry, given the issuer discovery named:
    /// that issuer, with the placeholder (if there is one) replaced by the
    /// token's tenant claim. `None` when the template needs a tenant and the
    /// token names none that could be one.
    pub fn expected_issuer(&self, discovered: &str, claims: &Value) -> Option<String> {
        if !discovered.contains(&self.placeholder) {
            return Some(discovered.to_string());
        }
        let tenant = claims
            .get(&self.claim)
            .and_then(Value::as_str)
            .filter(|t| plausible_tenant(t))?;
        Some(discovered.replace(&self.placeholder, tenant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entra() -> TenantIssuer {
        TenantIssuer {
            placeholder: "{tenantid}".into(),
            claim: "tid".into(),
        }
    }

    const COMMON: &str = "https://login.example/common/v2.0";
    const TEMPLATE: &str = "https://login.example/{tenantid}/v2.0";
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

    #[test]
    fn discovery_may_name_the_template_or_the_tenant_an_alias_stands_for() {
        let t = entra();
        assert!(t.accepts_discovery(COMMON, COMMON));
        assert!(t.accepts_discovery(COMMON, TEMPLATE));
        assert!(t.accepts_discovery(
            "https://login.example/consumers/v2.0",
            "https://login.example/9188040d-6c67-4c5b-b112-36a304b66dad/v2.0/"
        ));
        // Another host, another version, two segments, a path walk: no.
        assert!(!t.accepts_discovery(COMMON, "https://evil.example/{tenantid}/v2.0"));
        assert!(!t.accepts_discovery(COMMON, "https://login.example/common/v1.0"));
        assert!(!t.accepts_discovery(COMMON, "https://login.example/a/v1.0"));
        assert!(!t.accepts_discovery(COMMON, "https://login.example/../v2.0"));
        assert!(!t.accepts_discovery(COMMON, "https://login.example/x/y/v2.0"));
        assert!(!t.accepts_discovery("https://login.example", "https://other.example"));
    }

    #[test]
    fn the_token_s_issuer_is_the_template_filled_with_its_own_tenant() {
        let t = entra();
        assert_eq!(
            t.expected_issuer(TEMPLATE, &json!({"tid": TENANT})),
            Some(format!("https://login.example/{TENANT}/v2.0"))
        );
        // A single-tenant issuer is what it is, whatever the claim says.
        let single = format!("https://login.example/{TENANT}/v2.0");
        assert_eq!(
            t.expected_issuer(&single, &json!({"tid": "other"})),
            Some(single.clone())
        );
        // No tenant, or one that would change the URL's shape: nothing fits.
        assert_eq!(t.expected_issuer(TEMPLATE, &json!({})), None);
        assert_eq!(t.expected_issuer(TEMPLATE, &json!({"tid": 7})), None);
        assert_eq!(t.expected_issuer(TEMPLATE, &json!({"tid": "a/b"})), None);
        assert_eq!(t.expected_issuer(TEMPLATE, &json!({"tid": ""})), None);
    }
}
