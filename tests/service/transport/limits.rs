//! `[server]` limits: streams per connection, calls in progress, the
//! request time limit, and per-key rates, as a client meets them.

use std::{
    collections::HashSet,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use authbroker::{
    app::Wrap,
    grpc::pb,
    store::{
        StoreError,
        interposed::{Hooks, Interposed},
    },
};
use tokio::sync::{Semaphore, mpsc};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

use crate::support::{
    ADMIN_KEY, Backend, LOGIN_KEY, TestApp, assert_error, authed, spawn_app_on, spawn_app_wrapped,
};

/// Opens `n` `Health/Watch` streams on `channel`; each task reports its
/// index once its first status arrives, then holds the stream open.
fn open_watches(
    channel: &Channel,
    n: usize,
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    mpsc::UnboundedReceiver<usize>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tasks = (0..n)
        .map(|i| {
            let (channel, tx) = (channel.clone(), tx.clone());
            tokio::spawn(async move {
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                let Ok(stream) = HealthClient::new(channel).watch(request).await else {
                    return;
                };
                let mut stream = stream.into_inner();
                if let Ok(Some(_)) = stream.message().await {
                    let _ = tx.send(i);
                }
                std::future::pending::<()>().await;
            })
        })
        .collect();
    (tasks, rx)
}

/// Indexes reported within `quiet` of each other, starting within `first`.
async fn reported(
    rx: &mut mpsc::UnboundedReceiver<usize>,
    first: Duration,
    quiet: Duration,
) -> Vec<usize> {
    let mut seen = Vec::new();
    let mut wait = first;
    while let Ok(Some(i)) = tokio::time::timeout(wait, rx.recv()).await {
        seen.push(i);
        wait = quiet;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_per_connection_limit_wait_for_a_free_one() {
    let app = spawn_app_on(Backend::Sqlite, |_| {}).await;
    // The default: 200 streams at once on one connection (tonic's own
    // default would have been no limit at all).
    let (tasks, mut rx) = open_watches(&app.channel, 250);
    let served = reported(&mut rx, Duration::from_secs(10), Duration::from_secs(1)).await;
    assert_eq!(
        served.len(),
        200,
        "streams served at once on one connection"
    );

    // Closing 50 lets the 50 that waited through, and no more.
    for &i in &served[..50] {
        tasks[i].abort();
    }
    let late = reported(&mut rx, Duration::from_secs(10), Duration::from_secs(1)).await;
    assert_eq!(late.len(), 50);
    let early: HashSet<usize> = served.iter().copied().collect();
    assert!(late.iter().all(|i| !early.contains(i)));

    // Calls still go through once a stream is free.
    for task in &tasks {
        task.abort();
    }
    app.begin_with("sandbox").await;
    app.stop().await;
}

/// Holds every CompleteLogin just before its database transaction until
/// the test lets it go.
struct Gate {
    arrived: Semaphore,
    open: Semaphore,
}

#[async_trait]
impl Hooks for Gate {
    async fn before_bind(&self) -> Result<(), StoreError> {
        self.arrived.add_permits(1);
        if let Ok(permit) = self.open.acquire().await {
            permit.forget();
        }
        Ok(())
    }
}

async fn gated_app(
    configure: impl FnOnce(&mut authbroker::config::Settings),
) -> (TestApp, Arc<Gate>) {
    let gate = Arc::new(Gate {
        arrived: Semaphore::new(0),
        open: Semaphore::new(0),
    });
    let hooks = gate.clone();
    let wrap = Wrap {
        store: Some(Box::new(move |inner| {
            Arc::new(Interposed::new(inner, hooks)) as _
        })),
        states: None,
    };
    (
        spawn_app_wrapped(Backend::Sqlite, configure, wrap).await,
        gate,
    )
}

/// Starts a sandbox login as `user` whose CompleteLogin runs in the
/// background (until the gate lets it through).
async fn complete_in_background(
    app: &TestApp,
    user: &str,
) -> tokio::task::JoinHandle<Result<pb::CompleteLoginResponse, tonic::Status>> {
    let begun = app.begin_with("sandbox").await;
    let (code, state) = app.sandbox_authorize(&begun.authorize_url, user).await;
    let mut client = app.client();
    tokio::spawn(async move {
        client
            .complete_login(authed(
                pb::CompleteLoginRequest {
                    state,
                    code,
                    ..Default::default()
                },
                LOGIN_KEY,
            ))
            .await
            .map(|r| r.into_inner())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_concurrent_calls_a_call_is_refused_at_once() {
    let (app, gate) = gated_app(|s| s.server.max_concurrent_calls = 2).await;
    let first = complete_in_background(&app, "alice").await;
    let second = complete_in_background(&app, "bob").await;
    gate.arrived.acquire_many(2).await.unwrap().forget();

    // Two calls in progress: a third is shed, not queued.
    let started = Instant::now();
    let e = app.begin(sandbox()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    let message = assert_error(&e, Code::Unavailable, "SERVER_OVERLOADED");
    assert!(message.contains("2 calls"), "{message}");
    let e = app
        .admin()
        .list_users(authed(pb::ListUsersRequest::default(), ADMIN_KEY))
        .await
        .unwrap_err();
    assert_error(&e, Code::Unavailable, "SERVER_OVERLOADED");
    // Health is not counted; callers without a key are refused as usual.
    HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    let e = app
        .client()
        .begin_login(pb::BeginLoginRequest::default())
        .await
        .unwrap_err();
    assert_error(&e, Code::Unauthenticated, "API_KEY_MISSING");

    // Once they finish, calls go through again.
    gate.open.add_permits(2);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    app.begin_with("sandbox").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_request_timeout_is_abandoned_and_frees_its_place() {
    let (app, gate) = gated_app(|s| {
        s.http.timeout = Duration::from_millis(250);
        s.server.request_timeout = Duration::from_secs(1);
        s.server.max_concurrent_calls = 1;
    })
    .await;
    let stuck = complete_in_background(&app, "alice").await;
    gate.arrived.acquire().await.unwrap().forget();
    let started = Instant::now();
    let e = stuck.await.unwrap().unwrap_err();
    assert_error(&e, Code::DeadlineExceeded, "REQUEST_TIMEOUT");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Its place among the calls in progress is free again.
    app.begin_with("sandbox").await;
    gate.open.add_permits(1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_is_told_when_to_retry() {
    let app = spawn_app_on(Backend::Sqlite, |s| {
        s.auth.api_keys[0].rate = Some("3/h".into());
    })
    .await;
    for _ in 0..3 {
        app.begin_with("sandbox").await;
    }
    let e = app.begin(sandbox()).await.unwrap_err();
    assert_error(&e, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(e.get_details_error_info().unwrap().metadata["limit"], "3/h");
    let retry = e
        .get_details_retry_info()
        .expect("RetryInfo")
        .retry_delay
        .unwrap();
    assert!(
        retry > Duration::from_secs(19 * 60) && retry <= Duration::from_secs(20 * 60),
        "{retry:?}"
    );
    // Another key, and health, are not held back.
    for _ in 0..5 {
        app.admin()
            .list_users(authed(pb::ListUsersRequest::default(), ADMIN_KEY))
            .await
            .unwrap();
    }
    app.stop().await;
}

fn sandbox() -> pb::BeginLoginRequest {
    pb::BeginLoginRequest {
        provider: "sandbox".into(),
        ..Default::default()
    }
}

/// `authbroker serve` in the background, for measuring its memory.
struct ServeProcess {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    fn start(extra_server_keys: &str) -> ServeProcess {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("authbroker.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = "127.0.0.1:{port}"
{extra_server_keys}
[database]
url = "sqlite://{db}"
[auth]
allow_unauthenticated = true
[providers.github]
kind = "github"
client_id = "x"
client_secret = "y"
redirect_uris = ["https://app.example.com/cb"]
"#,
                db = dir.path().join("ab.db").display()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_authbroker"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        ServeProcess {
            child,
            port,
            _dir: dir,
        }
    }

    /// Resident memory, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    async fn channel(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
                .unwrap()
                .connect()
                .await
            {
                Ok(channel) => return channel,
                Err(e) if Instant::now() > deadline => panic!("serve never listened: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The review's probe: 20,000 `Health/Watch` streams on one connection
/// with no API key. They were all served, and the server's memory grew by
/// about 185 MB and stayed there. Now 200 are served and the rest wait on
/// the client's side, so the server grows by a few MB at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_watch_streams_on_one_connection_cost_the_server_little() {
    let served = ServeProcess::start("");
    let channel = served.channel().await;
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    let before = served.rss_kib();
    let (tasks, mut rx) = open_watches(&channel, 20_000);
    let open = reported(&mut rx, Duration::from_secs(30), Duration::from_secs(2)).await;
    let during = served.rss_kib();
    for task in &tasks {
        task.abort();
    }
    eprintln!(
        "Watch streams answered: {}; server RSS {} KiB before, {} KiB with them open (+{} KiB)",
        open.len(),
        before,
        during,
        during.saturating_sub(before)
    );
    assert_eq!(open.len(), 200);
    assert!(
        during.saturating_sub(before) < 32 * 1024,
        "the server grew by {} KiB",
        during - before
    );
}
