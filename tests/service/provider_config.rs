//! Provider configuration as a new user writes it: every README example
//! (one per preset, and generic OIDC) builds and states the preset's
//! default scopes; `issuer = "…"` at the top of `[providers.NAME]`; and
//! `check-config --online` against the Google emulator (an unreachable
//! issuer, a JWKS that is not one, discovery naming endpoints in clear).

use std::{collections::BTreeSet, process::Output};

use crate::support::emulators::google::GoogleEmulator;
use authbroker::{
    config::Settings,
    http::HttpClient,
    provider::{Registry, presets},
};

const README: &str = include_str!("../../README.md");

/// The TOML blocks between the README's preset-example markers.
fn examples() -> Vec<&'static str> {
    let start = README
        .find("<!-- preset-examples:start -->")
        .expect("README has preset examples");
    let end = README.find("<!-- preset-examples:end -->").unwrap();
    README[start..end]
        .split("```toml")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect()
}

fn settings_from(toml_text: &str) -> Result<Settings, String> {
    use figment::providers::{Format, Serialized, Toml};
    Settings::from_figment(
        figment::Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(toml_text)),
    )
    .map_err(|e| e.to_string())
}

fn build(toml_text: &str) -> Result<Registry, Vec<String>> {
    let settings = settings_from(toml_text).map_err(|e| vec![e])?;
    let http = HttpClient::new(&settings.http).unwrap();
    Registry::build(&settings.providers, &http, None)
}

/// The scopes a preset asks for when config does not say.
fn default_scopes(kind: &str) -> Vec<String> {
    match (presets::preset(kind), presets::oidc_preset(kind)) {
        (Some(spec), _) => spec.unwrap().default_scopes,
        (_, Some(spec)) => spec.unwrap().default_scopes,
        // Generic OIDC.
        _ => vec!["openid".into(), "email".into(), "profile".into()],
    }
}

#[test]
fn every_readme_example_builds_and_names_its_default_scopes() {
    let mut kinds = BTreeSet::new();
    for block in examples() {
        let settings = settings_from(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        assert_eq!(settings.providers.len(), 1, "{block}");
        let (name, cfg) = settings.providers.iter().next().unwrap();
        build(block).unwrap_or_else(|p| panic!("README example {name}: {p:#?}"));
        let listed = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("# default scopes:"))
            .unwrap_or_else(|| panic!("{name}: no `# default scopes:` line"));
        let listed: Vec<&str> = listed
            .split("(")
            .next()
            .unwrap()
            .split_whitespace()
            .filter(|s| *s != "none")
            .collect();
        assert_eq!(listed, default_scopes(&cfg.kind), "{name}: default scopes");
        assert!(
            cfg.client_secret.is_some() && !cfg.client_id.is_empty(),
            "{name}: both credentials are shown"
        );
        kinds.insert(cfg.kind.clone());
    }
    // apple and alipay need key files: their examples follow the block and
    // are built by tests/providers (microsoft_apple.rs, conformance.rs).
    for kind in [
        "qq",
        "wechat",
        "weibo",
        "gitee",
        "acwing",
        "qiita",
        "github",
        "google",
        "oidc",
        "gitlab",
        "dingtalk",
        "feishu",
        "lark",
        "microsoft",
    ] {
        assert!(kinds.contains(kind), "README has no example for {kind}");
    }
}

/// The README's notes on Qiita's redirect URI and AcWing's trailing slash
/// sit in those examples.
#[test]
fn the_qiita_and_acwing_examples_carry_their_notes() {
    let of = |kind: &str| {
        examples()
            .into_iter()
            .find(|b| b.contains(&format!("kind = \"{kind}\"")))
            .unwrap()
    };
    assert!(of("qiita").contains("registered with the application"));
    let acwing = of("acwing");
    assert!(acwing.contains("slash"));
    let settings = settings_from(acwing).unwrap();
    for url in settings.providers["acwing"].endpoints.values() {
        assert!(url.ends_with('/'), "{url}");
    }
}

/// What a new user writes first is accepted, where it means something.
#[test]
fn issuer_at_the_top_of_a_provider_is_accepted_for_oidc_only() {
    let oidc = r#"
[providers.corp]
kind = "oidc"
issuer = "https://idp.example.com/"
client_id = "x"
client_secret = "y"
redirect_uris = ["https://app.example.com/cb"]
"#;
    build(oidc).unwrap_or_else(|p| panic!("{p:#?}"));

    let both = oidc.replace(
        "redirect_uris",
        "endpoints = { issuer = \"https://other.example.com\" }\nredirect_uris",
    );
    let problems = build(&both).err().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("providers.corp.issuer: set issuer or endpoints.issuer")),
        "{problems:#?}"
    );

    let github = oidc.replace("kind = \"oidc\"", "kind = \"github\"");
    let problems = build(&github).err().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("providers.corp.issuer: only OIDC providers")),
        "{problems:#?}"
    );

    let missing = oidc.replace("issuer = \"https://idp.example.com/\"\n", "");
    let problems = build(&missing).err().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("providers.corp.issuer: kind \"oidc\" needs the issuer URL")),
        "{problems:#?}"
    );
}

const KEYS: &str = r#"
[database]
url = "sqlite://./ab.db"
[[auth.api_keys]]
name = "web"
sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
role = "login"
"#;

fn oidc_provider(name: &str, issuer: &str, extra: &str) -> String {
    format!(
        r#"
[providers.{name}]
kind = "oidc"
issuer = "{issuer}"
client_id = "x"
client_secret = "y"
redirect_uris = ["https://app.example.com/cb"]
{extra}
"#
    )
}

/// `authbroker check-config ARGS` on `config`, off the runtime the
/// emulators answer on.
async fn check_config(args: &'static [&'static str], config: String) -> Output {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<&str> = std::iter::once("check-config")
            .chain(args.iter().copied())
            .collect();
        let mut cmd = crate::cli::command(dir.path(), &args, &config);
        cmd.output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn check_config_online_reports_every_problem_of_every_oidc_provider() {
    let good = GoogleEmulator::start().await;
    let clear = GoogleEmulator::start().await;
    clear.set_endpoints_base(Some("http://idp.example.test".into()));
    let bad_jwks = GoogleEmulator::start().await;
    let config = [
        KEYS.to_string(),
        oidc_provider("good", good.issuer(), ""),
        oidc_provider("down", "http://127.0.0.1:9", ""),
        oidc_provider("clear", clear.issuer(), ""),
        oidc_provider(
            "badjwks",
            bad_jwks.issuer(),
            &format!(
                "endpoints = {{ jwks_uri = \"{}/.well-known/openid-configuration\" }}",
                bad_jwks.issuer()
            ),
        ),
        oidc_provider(
            "wrongauth",
            good.issuer(),
            "token_auth = \"private_key_jwt\"\nprivate_key_file = \"/nonexistent.pem\"",
        ),
    ]
    .concat();
    // Offline, only the key file is wrong.
    let offline = check_config(&[], config.clone()).await;
    let stderr = String::from_utf8_lossy(&offline.stderr);
    assert!(
        stderr.contains("providers.wrongauth.private_key_file"),
        "{stderr}"
    );

    // Online, with a key, every provider's problems.
    let config = config.replace(
        "/nonexistent.pem",
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/keys/rsa.pem"),
    );
    let out = check_config(&["--online"], config).await;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  - ")).collect();
    let has = |prefix: &str, what: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(&format!("  - providers.{prefix}")) && l.contains(what))
    };
    assert!(
        !lines.iter().any(|l| l.contains("providers.good")),
        "{stderr}"
    );
    assert!(has("down: discovery", "unavailable"), "{stderr}");
    assert!(
        has("clear: ", "token_endpoint at http://idp.example.test"),
        "{stderr}"
    );
    assert!(
        has("clear: ", "jwks_uri at http://idp.example.test"),
        "{stderr}"
    );
    assert!(has("badjwks: jwks", "not a JWK set"), "{stderr}");
    assert!(
        has("wrongauth.token_auth", "private_key_jwt is not among"),
        "{stderr}"
    );
}
