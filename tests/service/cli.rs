//! The `authbroker` command line: check-config, serve's refusal to run open,
//! migrate, healthcheck; and the container image's build (`docker_build`).

use crate::support::db;

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

fn authbroker(args: &[&str], config: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    command(dir.path(), args, config).output().unwrap()
}

/// `authbroker ARGS --config FILE` in `dir`, FILE holding `config`, with no
/// AUTHBROKER variables from the test's environment.
pub(crate) fn command(dir: &Path, args: &[&str], config: &str) -> Command {
    let path = dir.join(format!("{}.toml", args[0]));
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_authbroker"));
    cmd.args(args).arg("--config").arg(&path).current_dir(dir);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AUTHBROKER") {
            cmd.env_remove(k);
        }
    }
    cmd
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

/// Every unsafe setup `serve` refuses, each in one provider or section.
const UNSAFE: &str = r#"
[server]
listen = "0.0.0.0:0"
[database]
url = "sqlite://./ab.db"
[auth]
allow_unauthenticated = true
[http]
ca_file = "ca.pem"
[providers.sandbox]
kind = "sandbox"
redirect_uris = ["http://127.0.0.1:8000/callback"]
[providers.corp]
kind = "oidc"
client_id = "c"
client_secret = "s"
redirect_uris = ["https://app.example.com/cb"]
[providers.corp.endpoints]
issuer = "http://sso.corp.example"
"#;

#[test]
fn check_config_and_serve_name_each_unsafe_setup_and_its_opt_in() {
    for args in [&["check-config"][..], &["serve"]] {
        let out = authbroker(args, UNSAFE);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for needle in [
            "providers.sandbox.allow_sandbox",
            "providers.corp.endpoints.issuer: http://sso.corp.example is http://",
            "set providers.corp.allow_insecure_http = true",
            "auth.allow_unauthenticated_remote = true",
        ] {
            assert!(err.contains(needle), "{args:?}: no {needle:?} in:\n{err}");
        }
        if args == ["check-config"] {
            assert!(err.contains("http.ca_file: cannot read ca.pem"), "{err}");
            assert!(err.contains("4 problem(s)"), "{err}");
        }
    }

    // Opted into by name, with a CA file that holds a certificate.
    let opted = UNSAFE
        .replace(
            "kind = \"sandbox\"\n",
            "kind = \"sandbox\"\nallow_sandbox = true\n",
        )
        .replace(
            "kind = \"oidc\"\n",
            "kind = \"oidc\"\nallow_insecure_http = true\n",
        )
        .replace(
            "allow_unauthenticated = true\n",
            "allow_unauthenticated = true\nallow_unauthenticated_remote = true\n",
        );
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(Vec::new())
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let out = command(dir.path(), &["check-config"], &opted)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// `authbroker serve` in the background on a free loopback port; killed on drop.
struct Served {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Served {
    /// `database` is the `[database]` url; every caller is trusted.
    fn start(database: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = command(
            dir.path(),
            &["serve"],
            &served_config(database, "127.0.0.1", port),
        )
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the authbroker binary starts");
        Served { child, port, dir }
    }

    /// `authbroker healthcheck` with the server's configuration, except that
    /// it names the address `listen_ip` (0.0.0.0 for a container's server).
    fn healthcheck(&self, database: &str, listen_ip: &str) -> Output {
        let config = served_config(database, listen_ip, self.port);
        command(self.dir.path(), &["healthcheck"], &config)
            .output()
            .unwrap()
    }

    /// Checks every 100 ms, as the server's configuration says (0.0.0.0),
    /// until `done` holds or 30 s pass; returns the last check.
    fn healthcheck_until(&self, database: &str, done: impl Fn(&Output) -> bool) -> Output {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.healthcheck(database, "0.0.0.0");
            if done(&out) || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn served_config(database: &str, ip: &str, port: u16) -> String {
    format!(
        r#"
[server]
listen = "{ip}:{port}"
[database]
url = "{database}"
[auth]
allow_unauthenticated = true
[providers.sandbox]
kind = "sandbox"
allow_sandbox = true
redirect_uris = ["http://127.0.0.1:8000/callback"]
"#
    )
}

/// Nothing listens on port 1, so this store never becomes reachable.
const UNREACHABLE_POSTGRES: &str = "postgres://authbroker@127.0.0.1:1/authbroker";

#[test]
fn healthcheck_passes_while_serving_and_fails_once_stopped() {
    let mut served = Served::start("sqlite://./ab.db");
    // Refused until it listens, NOT_SERVING until its first store check.
    let out = served.healthcheck_until("sqlite://./ab.db", |out| out.status.success());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("127.0.0.1:{} is SERVING", served.port)),
        "0.0.0.0 is checked on loopback: {stdout}"
    );

    served.child.kill().unwrap();
    served.child.wait().unwrap();
    let out = served.healthcheck("sqlite://./ab.db", "127.0.0.1");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[test]
fn healthcheck_fails_while_not_serving() {
    let served = Served::start(UNREACHABLE_POSTGRES);
    let out = served.healthcheck_until(UNREACHABLE_POSTGRES, |out| {
        !String::from_utf8_lossy(&out.stderr).contains("cannot connect")
    });
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is NOT_SERVING"), "{stderr}");
}

#[test]
fn healthcheck_gives_up_on_a_silent_server() {
    // Accepted by the kernel, never answered: no HTTP/2, no gRPC.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let started = Instant::now();
    let out = authbroker(&["healthcheck", "--addr", &addr, "--timeout", "500ms"], "");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no answer from {addr} within 500ms")),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Logs into a pipe (or a file) are plain text, with no colour codes; and
/// at debug, tokio_postgres (which would log every statement's parameters)
/// stays quiet unless the filter names it.
#[test]
fn logs_to_a_pipe_are_plain_and_keep_statements_quiet() {
    let db = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(db::fresh_database());
    let config = format!("[database]\nurl = \"{}\"\n", db.url);
    let migrate = |filter: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = command(dir.path(), &["migrate"], &config)
            .env("RUST_LOG", filter)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let err = migrate("debug");
    assert!(err.contains("DEBUG"), "debug logs were written: {err}");
    assert!(!err.contains('\x1b'), "colour codes in a pipe: {err:?}");
    assert!(
        !err.contains("tokio_postgres"),
        "statements were logged: {err}"
    );
    // Named in the filter, the target is heard (and still plain).
    let err = migrate("tokio_postgres=debug");
    assert!(err.contains("tokio_postgres"), "{err}");
    assert!(!err.contains('\x1b'), "{err:?}");
}
