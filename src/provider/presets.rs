//! The built-in presets: the data files under `providers/`, embedded at
//! compile time, and their lookup by kind. OAuth2 presets parse into a
//! [`ProviderSpec`], OpenID Connect ones into an [`OidcSpec`]. Each file's
//! header cites its section of `docs/providers.md`, the project's reference
//! for that provider's wire format.

use super::{oidc::OidcSpec, spec::ProviderSpec};

/// Built-in OAuth2 presets (schema: `spec::ProviderSpec`).
pub const PRESETS: &[(&str, &str)] = &[
    ("acwing", include_str!("../../providers/acwing.toml")),
    ("alipay", include_str!("../../providers/alipay.toml")),
    ("dingtalk", include_str!("../../providers/dingtalk.toml")),
    ("feishu", include_str!("../../providers/feishu.toml")),
    ("gitee", include_str!("../../providers/gitee.toml")),
    ("github", include_str!("../../providers/github.toml")),
    ("lark", include_str!("../../providers/lark.toml")),
    ("qiita", include_str!("../../providers/qiita.toml")),
    ("qq", include_str!("../../providers/qq.toml")),
    ("sandbox", include_str!("../../providers/sandbox.toml")),
    ("wechat", include_str!("../../providers/wechat.toml")),
    ("weibo", include_str!("../../providers/weibo.toml")),
];

/// Built-in OpenID Connect presets (schema: `oidc::OidcSpec`).
pub const OIDC_PRESETS: &[(&str, &str)] = &[
    ("apple", include_str!("../../providers/apple.toml")),
    ("gitlab", include_str!("../../providers/gitlab.toml")),
    ("google", include_str!("../../providers/google.toml")),
    ("microsoft", include_str!("../../providers/microsoft.toml")),
];

pub fn preset(kind: &str) -> Option<Result<ProviderSpec, String>> {
    PRESETS
        .iter()
        .find(|(name, _)| *name == kind)
        .map(|(_, text)| ProviderSpec::parse(text))
}

pub fn oidc_preset(kind: &str) -> Option<Result<OidcSpec, String>> {
    OIDC_PRESETS
        .iter()
        .find(|(name, _)| *name == kind)
        .map(|(_, text)| toml::from_str(text).map_err(|e| e.message().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROVIDERS_DOC: &str = include_str!("../../docs/providers.md");

    #[test]
    fn every_preset_parses() {
        for (name, text) in PRESETS {
            ProviderSpec::parse(text).unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
        for (name, _) in OIDC_PRESETS {
            oidc_preset(name)
                .unwrap()
                .unwrap_or_else(|e| panic!("preset {name}: {e}"));
        }
    }

    /// `serve`'s clear-text check (`config::Settings::validate`) looks only
    /// at URLs in the config; it relies on this.
    #[test]
    fn every_preset_url_is_https() {
        for (name, _) in PRESETS.iter().filter(|(name, _)| *name != "sandbox") {
            let spec = preset(name).unwrap().unwrap();
            for (key, url) in &spec.endpoints {
                assert!(url.starts_with("https://"), "{name}.{key}: {url}");
            }
        }
        for (name, _) in OIDC_PRESETS {
            let spec = oidc_preset(name).unwrap().unwrap();
            assert!(
                spec.issuer.starts_with("https://"),
                "{name}: {}",
                spec.issuer
            );
        }
    }

    /// Whether `docs/providers.md` has a `## name` section, which is what
    /// `docs/providers.md#name` links to.
    fn documented(name: &str) -> bool {
        PROVIDERS_DOC
            .lines()
            .any(|line| line.strip_prefix("## ") == Some(name))
    }

    /// Each preset's leading comment block names its own section of the
    /// provider reference, and that section exists.
    #[test]
    fn every_preset_cites_its_section_of_the_provider_reference() {
        for (name, text) in PRESETS.iter().chain(OIDC_PRESETS) {
            let header: Vec<&str> = text
                .lines()
                .take_while(|line| line.starts_with('#'))
                .collect();
            let citation = format!("docs/providers.md#{name}");
            assert!(
                header.iter().any(|line| line.contains(&citation)),
                "providers/{name}.toml: its header does not cite {citation}"
            );
            assert!(
                documented(name),
                "docs/providers.md has no `## {name}` section"
            );
        }
        // Generic OpenID Connect is a kind without a preset file.
        assert!(documented("oidc"), "docs/providers.md has no `## oidc`");
    }

    /// The `**Default scopes.**` paragraph of `## name`.
    fn default_scopes_paragraph(name: &str) -> &'static str {
        let heading = format!("\n## {name}\n");
        let start = PROVIDERS_DOC
            .find(&heading)
            .unwrap_or_else(|| panic!("no `## {name}`"));
        let section = &PROVIDERS_DOC[start + heading.len()..];
        let section = &section[..section.find("\n## ").unwrap_or(section.len())];
        let at = section
            .find("**Default scopes.**")
            .unwrap_or_else(|| panic!("`## {name}` has no **Default scopes.**"));
        let paragraph = &section[at..];
        &paragraph[..paragraph.find("\n\n").unwrap_or(paragraph.len())]
    }

    /// The reference names each preset's default scopes as the file sets them.
    #[test]
    fn the_provider_reference_lists_each_preset_s_default_scopes() {
        let mut all: Vec<(&str, Vec<String>)> = PRESETS
            .iter()
            .map(|(name, _)| (*name, preset(name).unwrap().unwrap().default_scopes))
            .collect();
        all.extend(
            OIDC_PRESETS
                .iter()
                .map(|(name, _)| (*name, oidc_preset(name).unwrap().unwrap().default_scopes)),
        );
        for (name, scopes) in all {
            let paragraph = default_scopes_paragraph(name);
            if scopes.is_empty() {
                assert!(paragraph.contains("None"), "{name}: {paragraph}");
            }
            for scope in scopes {
                assert!(
                    paragraph.contains(&scope),
                    "docs/providers.md#{name} does not list the default scope {scope}"
                );
            }
        }
    }
}
