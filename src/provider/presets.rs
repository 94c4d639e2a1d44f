//! The built-in presets: the data files under `providers/`, embedded at
//! compile time, and their lookup by kind. OAuth2 presets parse into a
//! [`ProviderSpec`], OpenID Connect ones into an [`OidcSpec`].

use super::{oidc::OidcSpec, spec::ProviderSpec};

/// Built-in OAuth2 presets (schema: `spec::ProviderSpec`).
pub const PRESETS: &[(&str, &str)] = &[
    ("acwing", include_str!("../../providers/acwing.toml")),
    ("gitee", include_str!("../../providers/gitee.toml")),
    ("github", include_str!("../../providers/github.toml")),
    ("qiita", include_str!("../../providers/qiita.toml")),
    ("qq", include_str!("../../providers/qq.toml")),
    ("sandbox", include_str!("../../providers/sandbox.toml")),
    ("wechat", include_str!("../../providers/wechat.toml")),
    ("weibo", include_str!("../../providers/weibo.toml")),
];

/// Built-in OpenID Connect presets (schema: `oidc::OidcSpec`).
pub const OIDC_PRESETS: &[(&str, &str)] =
    &[("google", include_str!("../../providers/google.toml"))];

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
}
