//! The example web apps (`examples/web/python`, Flask; `examples/web/node`,
//! Express) logged in to by a person in headless Chromium, against the real
//! `authbroker dev` binary: `examples/web/browser/login_scenario.js` signs in
//! as alice, logs out and in again, replays the callback URL, denies, and
//! links a `link_required` provider's identity; this module checks what each
//! step showed. Screenshots of every step, the driver's output and both
//! servers' logs are kept in `target/web-artifacts/<app>/`.
//!
//! Needs Debian's `chromium` (or `CHROMIUM`), `node`, `npm ci` in
//! `examples/web/{browser,node}` and the Python app's requirements, as
//! `.ci/run` installs them. Without them the tests skip loudly, except in CI
//! (`CI` set), where they fail.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

const STARTUP: Duration = Duration::from_secs(60);
const SCENARIO: Duration = Duration::from_secs(240);

/// One Chromium at a time: the two scenarios together would starve each
/// other (and every other test) on a two-core machine.
static BROWSER: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy)]
enum App {
    Flask,
    Express,
}

impl App {
    fn name(self) -> &'static str {
        match self {
            App::Flask => "python",
            App::Express => "node",
        }
    }

    fn dir(self) -> PathBuf {
        web_dir().join(self.name())
    }

    fn command(self) -> Command {
        let mut command = match self {
            App::Flask => {
                let mut c = Command::new("python3");
                c.arg("app.py").env("PYTHONUNBUFFERED", "1");
                c
            }
            App::Express => {
                let mut c = Command::new("node");
                c.arg("app.js");
                c
            }
        };
        command.current_dir(self.dir());
        command
    }

    /// What this app needs that is not there, each with how to get it.
    fn missing(self) -> Vec<String> {
        let mut missing = Vec::new();
        if !chromium().is_file() {
            missing.push(format!(
                "{} (apt-get install chromium, or set CHROMIUM)",
                chromium().display()
            ));
        }
        if !succeeds(Command::new("node").arg("--version")) {
            missing.push("node (apt-get install nodejs npm)".into());
            return missing;
        }
        let mut dirs = vec![web_dir().join("browser")];
        match self {
            App::Express => dirs.push(self.dir()),
            App::Flask => {
                let imports = Command::new("python3")
                    .args(["-c", "import flask, grpc, grpc_tools, grpc_status"])
                    .output();
                if !imports.is_ok_and(|o| o.status.success()) {
                    missing.push(
                        "python3 with the app's packages \
                         (python3 -m pip install -r examples/web/python/requirements.txt)"
                            .into(),
                    );
                }
            }
        }
        for dir in dirs {
            // Every dependency package.json names resolves from the app's dir.
            let resolves = Command::new("node")
                .args([
                    "-e",
                    "for (const d of Object.keys(require('./package.json').dependencies)) require.resolve(d)",
                ])
                .current_dir(&dir)
                .output();
            if !resolves.is_ok_and(|o| o.status.success()) {
                missing.push(format!("its npm packages (npm ci in {})", dir.display()));
            }
        }
        missing
    }
}

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/web")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from)
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `target/web-artifacts/<app>/`, emptied.
fn artifacts(app: App) -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory");
    let dir = target.join("web-artifacts").join(app.name());
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process that is killed when the test ends, however it ends.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited already.
    fn assert_alive(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{what} exited with {status}:\n{}", self.log());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `authbroker dev` in `dir` (its SQLite database goes there) on a port of
/// its own, with the dev sandbox redirecting to the app's port and a second
/// sandbox provider whose policy is `link_required`. Returns its gRPC address.
fn spawn_authbroker(dir: &Path, app_port: u16, log: PathBuf) -> (Running, SocketAddr) {
    let redirect = format!("[\"http://127.0.0.1:{app_port}/callback\"]");
    let config = dir.join("authbroker.toml");
    fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n\
             [providers.sandbox]\nredirect_uris = {redirect}\n\n\
             [providers.sandbox_link]\nkind = \"sandbox\"\nclient_id = \"sandbox\"\n\
             policy = \"link_required\"\nredirect_uris = {redirect}\n"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_authbroker"))
        .arg("dev")
        .arg("--config")
        .arg(&config)
        .current_dir(dir)
        .env_remove("AUTHBROKER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut running = Running { child, log };
    let stdout = running.child.stdout.take().unwrap();
    // dev prints its address in its quick start; read it off the pipe.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("authbroker dev is running on ") {
                let addr = rest.split_whitespace().next().unwrap_or_default().parse();
                let _ = tx.send(addr);
            }
        }
    });
    match rx.recv_timeout(STARTUP) {
        Ok(Ok(addr)) => (running, addr),
        _ => {
            running.assert_alive("authbroker dev");
            panic!("authbroker dev printed no address:\n{}", running.log());
        }
    }
}

fn spawn_app(app: App, port: u16, broker: SocketAddr, log: PathBuf) -> Running {
    let output = fs::File::create(&log).unwrap();
    let child = app
        .command()
        .env("AUTHBROKER_ADDR", broker.to_string())
        .env("PORT", port.to_string())
        .env("SECRET_KEY", "web-apps-test-session-key")
        .env_remove("AUTHBROKER_API_KEY")
        .env_remove("AUTHBROKER_PROVIDERS")
        .env_remove("PUBLIC_URL")
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .spawn()
        .unwrap();
    let mut running = Running { child, log };
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        running.assert_alive(app.name());
        assert!(
            started.elapsed() < STARTUP,
            "{} did not listen on {port}:\n{}",
            app.name(),
            running.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    running
}

/// Runs the browser scenario against `app_url`; returns what it saw.
fn run_scenario(app_url: &str, out: &Path) -> Value {
    let stdout = out.join("driver.out");
    let stderr = out.join("driver.err");
    let mut driver = Running {
        child: Command::new("node")
            .arg("login_scenario.js")
            .current_dir(web_dir().join("browser"))
            .env("APP_URL", app_url)
            .env("ARTIFACT_DIR", out)
            .env("CHROMIUM", chromium())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
        log: stderr,
    };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = driver.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < SCENARIO,
            "the browser scenario took over {SCENARIO:?}:\n{}",
            driver.log()
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "the browser scenario failed (screenshots in {}):\n{}",
        out.display(),
        driver.log()
    );
    let printed = fs::read_to_string(&stdout).unwrap();
    serde_json::from_str(printed.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the driver printed no JSON ({e}):\n{printed}"))
}

fn logs_in_through_chromium(app: App) {
    let missing = app.missing();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs for the {} example's browser test: {}",
            app.name(),
            missing.join("; ")
        );
        eprintln!(
            "SKIPPED: the {} example's browser test needs {}",
            app.name(),
            missing.join("; ")
        );
        return;
    }
    let _one_browser = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let out = artifacts(app);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (authbroker, broker) = spawn_authbroker(dir.path(), port, out.join("authbroker.log"));
    let server = spawn_app(app, port, broker, out.join("app.log"));
    let seen = run_scenario(&format!("http://127.0.0.1:{port}"), &out);
    let context = || {
        format!(
            "{seen:#}\napp log:\n{}\nauthbroker log:\n{}",
            server.log(),
            authbroker.log()
        )
    };

    assert_eq!(seen["home"], "Welcome", "{}", context());
    // The sandbox's picker as a person sees it: its test users with their
    // avatars, and a way to say no.
    let picker = &seen["picker"];
    assert_eq!(picker["heading"], "authbroker sandbox", "{}", context());
    assert_eq!(
        picker["users"],
        serde_json::json!(["alice", "bob", "carol"]),
        "{}",
        context()
    );
    assert_eq!(picker["avatarsLoaded"], true, "{}", context());
    assert_eq!(picker["hasDeny"], true, "{}", context());

    let first = &seen["first"];
    assert_eq!(first["outcome"], "created", "{}", context());
    assert_eq!(first["name"], "Alice", "{}", context());
    let user_id = first["userId"].as_str().unwrap_or_default();
    assert!(!user_id.is_empty(), "{}", context());
    assert_eq!(seen["afterLogout"], "Welcome", "{}", context());
    assert_eq!(seen["second"]["outcome"], "signed_in", "{}", context());
    assert_eq!(seen["second"]["userId"], user_id, "{}", context());

    // The replayed callback's state is no longer in the session: the app
    // refuses it before asking authbroker. A denial is authbroker's
    // ACCESS_DENIED, read from the status details.
    assert_eq!(seen["replay"]["heading"], "Sign-in failed", "{}", context());
    assert_eq!(seen["replay"]["reason"], "STATE_MISMATCH", "{}", context());
    assert_eq!(seen["denied"]["heading"], "Sign-in failed", "{}", context());
    assert_eq!(seen["denied"]["reason"], "ACCESS_DENIED", "{}", context());
    assert!(
        seen["denied"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cancelled")),
        "{}",
        context()
    );

    assert_eq!(seen["linkPage"], "Link your sign-in", "{}", context());
    assert_eq!(seen["linked"]["outcome"], "linked", "{}", context());
    assert_eq!(seen["linked"]["userId"], user_id, "{}", context());

    assert_eq!(
        seen["problems"],
        serde_json::json!([]),
        "pages that did not load cleanly: {}",
        context()
    );
    let shots = seen["screenshots"].as_array().cloned().unwrap_or_default();
    assert_eq!(shots.len(), 9, "{}", context());
    for shot in shots {
        let path = shot.as_str().unwrap_or_default();
        assert!(
            fs::metadata(path).is_ok_and(|m| m.len() > 1000),
            "screenshot {path} is missing or empty"
        );
    }
}

#[test]
fn python_flask_app_logs_in_through_chromium() {
    logs_in_through_chromium(App::Flask);
}

#[test]
fn node_express_app_logs_in_through_chromium() {
    logs_in_through_chromium(App::Express);
}
