//! Settings an OpenID Connect preset takes from `[providers.NAME.options]`:
//! the preset file declares each with its default (`""` when config must
//! set it), and a `{name}` in the preset's issuer is replaced by the value.
//! Microsoft's `tenant` picks the directory (`common`, `organizations`,
//! `consumers` or a tenant id); Apple's `team_id` goes into its minted
//! client secret.

use std::collections::BTreeMap;

/// A value that is safe as one segment of a URL path: a tenant name, a
/// GUID, a domain, a team id.
fn plausible(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The options in force: each declared one, from config or its default.
/// Problems are reported at `at` (`providers.NAME`), every one at once.
pub fn resolve(
    at: &str,
    declared: &BTreeMap<String, String>,
    configured: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Vec<String>> {
    let mut problems = Vec::new();
    for name in configured.keys().filter(|k| !declared.contains_key(*k)) {
        let known = if declared.is_empty() {
            "this kind takes none".to_string()
        } else {
            format!(
                "known: {}",
                declared.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        problems.push(format!("{at}.options.{name}: unknown option ({known})"));
    }
    let mut resolved = BTreeMap::new();
    for (name, default) in declared {
        let value = configured.get(name).unwrap_or(default).trim();
        if value.is_empty() {
            problems.push(format!("{at}.options.{name}: required"));
        } else if !plausible(value) {
            problems.push(format!(
                "{at}.options.{name}: {value:?} must be letters, digits, '-', '_' or '.'"
            ));
        } else {
            resolved.insert(name.clone(), value.to_string());
        }
    }
    if problems.is_empty() {
        Ok(resolved)
    } else {
        Err(problems)
    }
}

/// `template` with each `{name}` of `options` replaced by its value.
pub fn fill(template: &str, options: &BTreeMap<String, String>) -> String {
    options
        .iter()
        .fold(template.to_string(), |s, (name, value)| {
            s.replace(&format!("{{{name}}}"), value)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(items: &[(&str, &str)]) -> BTreeMap<String, String> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_fill_in_and_config_wins() {
        let declared = map(&[("tenant", "common")]);
        let got = resolve("p", &declared, &map(&[])).unwrap();
        assert_eq!(got, map(&[("tenant", "common")]));
        let got = resolve(
            "p",
            &declared,
            &map(&[("tenant", "contoso.onmicrosoft.com")]),
        )
        .unwrap();
        assert_eq!(
            fill("https://login.example/{tenant}/v2.0", &got),
            "https://login.example/contoso.onmicrosoft.com/v2.0"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let declared = map(&[("team_id", ""), ("tenant", "common")]);
        let problems = resolve(
            "providers.p",
            &declared,
            &map(&[("tenant", "a/b"), ("colour", "blue")]),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("options.colour")));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("options.team_id: required"))
        );
        assert!(problems.iter().any(|p| p.contains("options.tenant")));
        let none = resolve("p", &map(&[]), &map(&[("x", "1")])).unwrap_err();
        assert!(none[0].contains("takes none"), "{none:?}");
        assert!(resolve("p", &map(&[("t", "..")]), &map(&[])).is_err());
    }
}
