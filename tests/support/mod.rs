//! Black-box test harness: each test gets a fresh database and an in-process
//! authbroker on port 0, and talks real gRPC to it over a socket.
#![allow(dead_code)]

pub mod db;
pub mod emulators;
pub mod faults;

use std::{sync::Arc, time::Duration};

use authbroker::{
    app::{Application, Wrap},
    config::{ApiKeyConfig, Mode, ProviderConfig, Role, Settings},
    grpc::pb::{
        self, admin_service_client::AdminServiceClient, login_service_client::LoginServiceClient,
    },
    store::Store,
};
use sha2::{Digest, Sha256};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

pub const LOGIN_KEY: &str = "test-login-key-0123456789";
pub const ADMIN_KEY: &str = "test-admin-key-9876543210";
pub const REDIRECT: &str = "https://app.example.com/oauth/callback";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub channel: Channel,
    pub store: Arc<dyn Store>,
    pub sandbox_url: Option<url::Url>,
    pub backend: Backend,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    _db: Option<db::TestDatabase>,
    _dir: Option<tempfile::TempDir>,
}

pub fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        authbroker::telemetry::init(&Default::default());
    }
}

/// Settings every test starts from: port 0, two API keys, the sandbox.
pub fn base_settings() -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.server.shutdown_grace = Duration::from_secs(2);
    s.login.return_to_origins = vec!["https://app.example.com".into()];
    s.auth.api_keys = vec![
        ApiKeyConfig {
            name: "web".into(),
            sha256: sha256_hex(LOGIN_KEY),
            role: Role::Login,
            rate: None,
        },
        ApiKeyConfig {
            name: "ops".into(),
            sha256: sha256_hex(ADMIN_KEY),
            role: Role::Admin,
            rate: None,
        },
    ];
    s.providers
        .insert("sandbox".into(), provider("sandbox", "", ""));
    s
}

/// A `[providers.NAME]` table; a sandbox comes with the `allow_sandbox`
/// opt-in `serve` asks for.
pub fn provider(kind: &str, client_id: &str, secret: &str) -> ProviderConfig {
    ProviderConfig {
        kind: kind.into(),
        client_id: client_id.into(),
        client_secret: (!secret.is_empty()).then(|| secret.into()),
        redirect_uris: vec![REDIRECT.into(), "https://app.example.com/other".into()],
        allow_sandbox: kind == "sandbox",
        ..Default::default()
    }
}

pub async fn spawn_app(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on(Backend::Postgres, configure).await
}

pub async fn spawn_app_on(backend: Backend, configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_wrapped(backend, configure, Wrap::default()).await
}

/// `spawn_app_on`, with the stores passed through `wrap` (fault injection).
pub async fn spawn_app_wrapped(
    backend: Backend,
    configure: impl FnOnce(&mut Settings),
    wrap: Wrap,
) -> TestApp {
    init_logs();
    let mut settings = base_settings();
    let (db, dir) = match backend {
        Backend::Postgres => {
            let db = db::fresh_database().await;
            settings.database.url = db.url.clone();
            (Some(db), None)
        }
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            settings.database.url = format!("sqlite://{}", dir.path().join("t.db").display());
            (None, Some(dir))
        }
    };
    configure(&mut settings);
    let app = Application::build_with(settings, Mode::Serve, wrap)
        .await
        .expect("the application builds");
    let addr = app.local_addr();
    let store = app.store();
    let sandbox_url = app.sandbox_url();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects to the app");
    TestApp {
        addr,
        channel,
        store,
        sandbox_url,
        backend,
        shutdown: Some(tx),
        handle: Some(handle),
        _db: db,
        _dir: dir,
    }
}

pub fn authed<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// A reqwest client that, like a test script, does not follow redirects.
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Query parameters of the Location a 302 points at.
pub fn redirect_params(location: &str) -> std::collections::HashMap<String, String> {
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

/// A fixed 32-byte vault key for tests (base64 of bytes 0..32).
pub const VAULT_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Turns on the token vault with one key.
pub fn with_vault(s: &mut Settings) {
    s.vault.keys = vec![authbroker::config::VaultKeyConfig {
        id: "test-1".into(),
        key: Some(VAULT_KEY.into()),
        key_file: None,
        key_env: None,
    }];
}

impl TestApp {
    pub fn client(&self) -> LoginServiceClient<Channel> {
        LoginServiceClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    pub async fn link(
        &self,
        link_ticket: &str,
        user_id: &str,
    ) -> Result<pb::LinkIdentityResponse, Status> {
        self.client()
            .link_identity(authed(
                pb::LinkIdentityRequest {
                    link_ticket: link_ticket.into(),
                    user_id: user_id.into(),
                },
                LOGIN_KEY,
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn begin(
        &self,
        req: pb::BeginLoginRequest,
    ) -> Result<pb::BeginLoginResponse, Status> {
        self.begin_as(LOGIN_KEY, req).await
    }

    /// BeginLogin with the API key `key`.
    pub async fn begin_as(
        &self,
        key: &str,
        req: pb::BeginLoginRequest,
    ) -> Result<pb::BeginLoginResponse, Status> {
        self.client()
            .begin_login(authed(req, key))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn begin_with(&self, provider: &str) -> pb::BeginLoginResponse {
        self.begin(pb::BeginLoginRequest {
            provider: provider.into(),
            ..Default::default()
        })
        .await
        .expect("BeginLogin succeeds")
    }

    pub async fn complete(
        &self,
        state: &str,
        code: &str,
    ) -> Result<pb::CompleteLoginResponse, Status> {
        self.complete_as(LOGIN_KEY, state, code).await
    }

    /// CompleteLogin with the API key `key`.
    pub async fn complete_as(
        &self,
        key: &str,
        state: &str,
        code: &str,
    ) -> Result<pb::CompleteLoginResponse, Status> {
        self.client()
            .complete_login(authed(
                pb::CompleteLoginRequest {
                    state: state.into(),
                    code: code.into(),
                    ..Default::default()
                },
                key,
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Follows the sandbox authorize URL as `user`; returns (code, state).
    pub async fn sandbox_authorize(&self, authorize_url: &str, user: &str) -> (String, String) {
        let resp = browser()
            .get(format!("{authorize_url}&sandbox_user={user}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 302, "sandbox approves at once");
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        assert!(location.starts_with(REDIRECT), "{location}");
        let params = redirect_params(&location);
        (params["code"].clone(), params["state"].clone())
    }

    /// A whole sandbox login as `user`.
    pub async fn sandbox_login(&self, user: &str) -> pb::CompleteLoginResponse {
        let begun = self.begin_with("sandbox").await;
        let (code, state) = self.sandbox_authorize(&begun.authorize_url, user).await;
        assert_eq!(state, begun.state);
        self.complete(&state, &code)
            .await
            .expect("CompleteLogin succeeds")
    }

    /// The test database's URL (Postgres) or file (SQLite).
    pub fn database_url(&self) -> String {
        match (&self._db, &self._dir) {
            (Some(db), _) => db.url.clone(),
            (_, Some(dir)) => format!("sqlite://{}", dir.path().join("t.db").display()),
            _ => unreachable!("every test app has a database"),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Asserts a status's code and `ErrorInfo` reason; returns the message.
#[track_caller]
pub fn assert_error(status: &Status, code: Code, reason: &str) -> String {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "authbroker");
    status.message().to_string()
}

/// The field named by the `BadRequest` violation.
pub fn violation_field(status: &Status) -> String {
    let br = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    br.field_violations[0].field.clone()
}
