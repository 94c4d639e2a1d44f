//! `authbroker serve` as a child process: the built binary, its config file,
//! an address of its own (where a restart comes back, as a load balancer
//! expects), its log in a file, and the gRPC calls the scenarios make. A replica
//! is killed when dropped, and when a test panics its log is printed.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use authbroker::grpc::pb::{
    self, admin_service_client::AdminServiceClient, login_service_client::LoginServiceClient,
};
use tonic::{
    Status,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{ADMIN_KEY, LOGIN_KEY, REDIRECT, authed, emulators::github, sha256_hex};

/// How long a replica gets to start (migrations included) and to stop.
const START_WITHIN: Duration = Duration::from_secs(20);
/// No single call in these tests takes longer unless something hangs.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A config file: the database at `database_url`, `[state]` with the keys
/// in `state`, the two API keys of `tests/support`, the app's origin, and
/// `extra` (`[providers.*]`, `[server]`).
pub fn config(database_url: &str, state: &str, extra: &str) -> String {
    // Small pools: three replicas with two pools each share the test
    // server's connections with every other test.
    format!(
        r#"[database]
url = "{database_url}"
pool_size = 4

[state]
pool_size = 4
{state}

[login]
return_to_origins = ["https://app.example.com"]

[http]
timeout = "5s"
connect_timeout = "1s"

[[auth.api_keys]]
name = "web"
sha256 = "{login}"
role = "login"

[[auth.api_keys]]
name = "ops"
sha256 = "{admin}"
role = "admin"

{extra}
"#,
        login = sha256_hex(LOGIN_KEY),
        admin = sha256_hex(ADMIN_KEY),
    )
}

/// `[providers.NAME]` of kind `github`, every endpoint on the emulator.
pub fn github_provider(name: &str, emulator: &github::GithubEmulator, policy: &str) -> String {
    format!(
        r#"[providers.{name}]
kind = "github"
client_id = "{id}"
client_secret = "{secret}"
redirect_uris = ["{REDIRECT}"]
policy = "{policy}"

[providers.{name}.endpoints]
authorize_url = "{authorize}"
token_url = "{token}"
userinfo_url = "{user}"
emails_url = "{emails}"
"#,
        id = github::CLIENT_ID,
        secret = github::CLIENT_SECRET,
        authorize = emulator.url(github::AUTHORIZE_PATH),
        token = emulator.url(github::TOKEN_PATH),
        user = emulator.url(github::USER_PATH),
        emails = emulator.url(github::EMAILS_PATH),
    )
}

/// Writes `config` as `DIR/NAME.toml` and returns its path.
pub fn write_config(dir: &Path, name: &str, config: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("write the config file");
    path
}

pub struct Replica {
    name: &'static str,
    pub addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Child,
    channel: Channel,
}

impl Replica {
    /// Starts `authbroker serve --config CONFIG` on a free port, without
    /// waiting for it: see [`Replica::serving`].
    pub fn spawn(name: &'static str, config: &Path) -> Replica {
        let addr = free_address();
        let log = config.with_file_name(format!("{name}.log"));
        let child = start(config, addr, &log);
        Replica {
            name,
            addr,
            config: config.to_owned(),
            log,
            child,
            channel: channel(addr),
        }
    }

    /// Waits until Health/Check (service "") answers SERVING.
    pub async fn serving(&mut self) {
        let started = Instant::now();
        while self.health().await != Some(ServingStatus::Serving) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("{} exited ({status}) before serving", self.name);
            }
            assert!(
                started.elapsed() < START_WITHIN,
                "{} not SERVING after {START_WITHIN:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "{} exited ({status}); something else answered on {}",
                self.name, self.addr
            );
        }
    }

    /// One Health/Check (service "") on a new connection; `None` when
    /// nothing answers.
    pub async fn health(&self) -> Option<ServingStatus> {
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("a URI")
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2));
        let channel = endpoint.connect().await.ok()?;
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let answer = HealthClient::new(channel).check(request).await.ok()?;
        Some(answer.into_inner().status())
    }

    /// Sends SIGTERM, as an orchestrator does to stop a replica.
    pub fn terminate(&self) {
        let pid = i32::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM to {}", self.name);
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn exited(&mut self, within: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "{} still running {within:?} after SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A rolling deploy of this replica: SIGTERM, a clean exit, a new
    /// process on the same port with the same config, SERVING again.
    pub async fn restart(&mut self) {
        self.terminate();
        let status = self.exited(START_WITHIN).await;
        assert!(status.success(), "{} exited with {status}", self.name);
        self.child = start(&self.config, self.addr, &self.log);
        self.channel = channel(self.addr);
        self.serving().await;
    }

    /// The replica's log so far (every run of it, appended).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Calls to this replica (to the process now running on its port).
    pub fn client(&self) -> Client {
        Client {
            name: self.name,
            channel: self.channel.clone(),
        }
    }
}

/// The LoginService and AdminService calls the tests make, with the API
/// keys of `tests/support`. Cheap to clone into a task.
#[derive(Clone)]
pub struct Client {
    pub name: &'static str,
    channel: Channel,
}

impl Client {
    pub async fn begin(&self, provider: &str) -> Result<pb::BeginLoginResponse, Status> {
        let request = pb::BeginLoginRequest {
            provider: provider.into(),
            ..Default::default()
        };
        let answer = self.login().begin_login(authed(request, LOGIN_KEY)).await;
        answer.map(tonic::Response::into_inner)
    }

    pub async fn complete(
        &self,
        state: &str,
        code: &str,
    ) -> Result<pb::CompleteLoginResponse, Status> {
        let request = pb::CompleteLoginRequest {
            state: state.into(),
            code: code.into(),
            ..Default::default()
        };
        let answer = self
            .login()
            .complete_login(authed(request, LOGIN_KEY))
            .await;
        answer.map(tonic::Response::into_inner)
    }

    pub async fn link(
        &self,
        ticket: &str,
        user_id: &str,
    ) -> Result<pb::LinkIdentityResponse, Status> {
        let request = pb::LinkIdentityRequest {
            link_ticket: ticket.into(),
            user_id: user_id.into(),
        };
        let answer = self.login().link_identity(authed(request, LOGIN_KEY)).await;
        answer.map(tonic::Response::into_inner)
    }

    /// Every user id (AdminService ListUsers, every page).
    pub async fn user_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListUsersRequest {
                page_size: 500,
                page_token,
                ..Default::default()
            };
            let page = AdminServiceClient::new(self.channel.clone())
                .list_users(authed(request, ADMIN_KEY))
                .await
                .unwrap_or_else(|e| panic!("ListUsers on {}: {e:?}", self.name))
                .into_inner();
            ids.extend(page.users.into_iter().map(|u| u.user_id));
            if page.next_page_token.is_empty() {
                return ids;
            }
            page_token = page.next_page_token;
        }
    }

    fn login(&self) -> LoginServiceClient<Channel> {
        LoginServiceClient::new(self.channel.clone())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- log of replica {} -----\n{}", self.name, self.log());
        }
    }
}

/// The binary with nothing from the test's environment that could change
/// its settings, listening on `addr`, its stderr appended to `log`.
fn start(config: &Path, addr: SocketAddr, log: &Path) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the replica's log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_authbroker"));
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .current_dir(config.parent().expect("the config's directory"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AUTHBROKER") {
            command.env_remove(key);
        }
    }
    command
        .env("AUTHBROKER__SERVER__LISTEN", addr.to_string())
        .env("RUST_LOG", "info")
        // The log is a file: no colour codes in it.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the authbroker binary starts")
}

/// A free port on a random address in 127.0.0.0/8, all of which is
/// loopback on Linux. A port alone is not enough: between our probe and the
/// replica's bind another test's server can take it, and then answers
/// Health/Check in the replica's place.
fn free_address() -> SocketAddr {
    let [b, c, d] = rand::random::<[u8; 3]>();
    let ip = Ipv4Addr::new(127, b, c, d.clamp(1, 254));
    TcpListener::bind((ip, 0))
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Connects on first use and again after a restart.
fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a URI")
        .timeout(CALL_TIMEOUT)
        .connect_lazy()
}
