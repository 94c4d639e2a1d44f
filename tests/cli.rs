//! The `authbroker` command line: check-config, serve's refusal to run open,
//! migrate.

use std::process::Command;

fn authbroker(args: &[&str], config: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authbroker.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_authbroker"));
    cmd.args(args)
        .arg("--config")
        .arg(&path)
        .current_dir(dir.path());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AUTHBROKER") {
            cmd.env_remove(k);
        }
    }
    cmd.output().unwrap()
}

const GOOD: &str = r#"
[database]
url = "sqlite://./ab.db"
[[auth.api_keys]]
name = "web"
sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
role = "login"
[providers.github]
kind = "github"
client_id = "Iv1.abc"
client_secret = "shh-very-secret"
redirect_uris = ["https://www.example.com/oauth_callback"]
"#;

#[test]
fn check_config_accepts_a_good_file() {
    let out = authbroker(&["check-config"], GOOD);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

#[test]
fn check_config_lists_every_problem_and_exits_1() {
    let out = authbroker(
        &["check-config"],
        r#"
[database]
url = "mysql://nope"
[login]
return_to_origins = ["https://app.example.com/path"]
[providers.gh]
kind = "github"
redirect_uris = []
[providers.qq]
kind = "no-such-preset"
client_id = "1"
client_secret = "s"
redirect_uris = ["https://x.example/cb"]
"#,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "database.url",
        "login.return_to_origins",
        "auth.api_keys",
        "providers.gh.client_id: required",
        "providers.gh: a client secret is required",
        "providers.gh.redirect_uris: at least one",
        "providers.qq.kind: unknown kind \"no-such-preset\"",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(err.contains("7 problem(s)"), "{err}");
}

#[test]
fn check_config_names_unknown_keys() {
    let out = authbroker(&["check-config"], "[login]\nstate_tll = \"5m\"\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("state_tll"));
}

#[test]
fn serve_refuses_to_run_without_api_keys() {
    let out = authbroker(
        &["serve"],
        r#"
[server]
listen = "127.0.0.1:0"
[providers.sandbox]
kind = "sandbox"
redirect_uris = ["http://127.0.0.1:8000/callback"]
"#,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allow_unauthenticated"), "{err}");
}

#[test]
fn secrets_never_reach_output() {
    let out = authbroker(&["check-config"], &GOOD.replace("Iv1.abc", ""));
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("shh-very-secret"));
}

#[test]
fn migrate_creates_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let out = authbroker(
        &["migrate"],
        &format!("[database]\nurl = \"sqlite://{}\"\n", db.display()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists());
    // Twice is fine.
    let out = authbroker(
        &["migrate"],
        &format!("[database]\nurl = \"sqlite://{}\"\n", db.display()),
    );
    assert!(out.status.success());
}

#[test]
fn the_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/authbroker.example.toml"
    ))
    .unwrap()
    .replace(
        "/run/secrets/github_client_secret",
        secret.to_str().unwrap(),
    );
    let out = authbroker(&["check-config"], &text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
