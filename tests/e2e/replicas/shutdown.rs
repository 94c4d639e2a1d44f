//! What one replica tells its load balancer during a rolling deploy: on
//! SIGTERM, Health/Watch hears NOT_SERVING at once and ends, a call in
//! flight still finishes, and the process exits without waiting out
//! `shutdown_grace`; and health is NOT_SERVING while the state backend is
//! unreachable. One replica on SQLite each; no shared state needed.

use std::time::{Duration, Instant};

use authbroker::grpc::pb::Outcome;
use tonic::{Code, transport::Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::replica::{Replica, config, github_provider, write_config};
use crate::support::{
    assert_error,
    emulators::{
        Emulator,
        github::{self, Endpoint as GithubEndpoint, GithubEmulator, GithubUser},
    },
    faults::Fault,
};

/// Far longer than the test may take: a replica that waits it out fails.
const GRACE: &str = "30s";
/// How long the test allows SIGTERM-to-exit; well inside `GRACE`.
const EXIT_WITHIN: Duration = Duration::from_secs(10);
/// How long the token exchange of the call in flight takes.
const SLOW_EXCHANGE: Duration = Duration::from_secs(2);
/// The bound on each step a load balancer waits for.
const PROMPTLY: Duration = Duration::from_secs(2);

/// One replica on its own SQLite file, `[state]` holding `state`.
fn solo(dir: &std::path::Path, state: &str, emulator: &GithubEmulator) -> Replica {
    let database = format!("sqlite://{}", dir.join("authbroker.db").display());
    let extra = format!(
        "[server]\nshutdown_grace = \"{GRACE}\"\n\n{}",
        github_provider("github", emulator, "auto_create")
    );
    let path = write_config(dir, "solo", &config(&database, state, &extra));
    Replica::spawn("solo", &path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_watch_streams_then_drains_calls_in_flight() {
    let emulator = GithubEmulator::start().await;
    emulator.add_account(GithubUser::octocat());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut replica = solo(dir.path(), "backend = \"memory\"", &emulator);
    replica.serving().await;

    // The load balancer's Watch, on a connection of its own.
    let watcher = Endpoint::from_shared(format!("http://{}", replica.addr))
        .expect("a URI")
        .connect()
        .await
        .expect("connect for Watch");
    let mut statuses = HealthClient::new(watcher)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Health/Watch")
        .into_inner();
    let first = statuses.message().await.expect("a status").expect("one");
    assert_eq!(first.status(), ServingStatus::Serving);

    // A CompleteLogin in flight: its code exchange hangs for a while.
    let client = replica.client();
    let begun = client.begin("github").await.expect("BeginLogin");
    let code = emulator
        .authorize(&begun.authorize_url, "octocat")
        .expect("the emulator accepts the authorize URL");
    emulator.set_endpoint_fault_times(GithubEndpoint::Token, Fault::Slow(SLOW_EXCHANGE), 1);
    let in_flight = tokio::spawn(async move { client.complete(&begun.state, &code).await });
    let started = Instant::now();
    while emulator.requests_to(github::TOKEN_PATH).is_empty() {
        assert!(started.elapsed() < PROMPTLY, "the exchange never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    replica.terminate();
    let stopping = Instant::now();
    let next = tokio::time::timeout(PROMPTLY, statuses.message())
        .await
        .expect("Watch hears of the shutdown promptly")
        .expect("a status")
        .expect("the stream is still open");
    assert_eq!(next.status(), ServingStatus::NotServing);
    assert!(
        !in_flight.is_finished(),
        "NOT_SERVING came before the drain"
    );
    let end = tokio::time::timeout(PROMPTLY, statuses.message())
        .await
        .expect("the Watch stream ends promptly");
    assert!(
        matches!(end, Ok(None)),
        "the Watch stream ends cleanly: {end:?}"
    );
    assert!(!in_flight.is_finished(), "Watch closed before the drain");

    let done = in_flight
        .await
        .expect("the call's task")
        .expect("the call in flight completes");
    assert_eq!(done.outcome(), Outcome::UserCreated);
    let status = replica.exited(EXIT_WITHIN).await;
    assert!(status.success(), "exit status {status}");
    eprintln!(
        "SIGTERM to exit: {:?} (shutdown_grace {GRACE})",
        stopping.elapsed()
    );
}

/// Readiness pings the state backend from its first round: a replica
/// whose Redis is down never says SERVING, not even for a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_the_state_backend_is_down() {
    let emulator = GithubEmulator::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    // Nothing listens on port 1.
    let state = "backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"";
    let mut replica = solo(dir.path(), state, &emulator);

    // It starts (the Redis client connects lazily) and answers.
    let started = Instant::now();
    let mut status = replica.health().await;
    while status.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "it never answered Health/Check"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = replica.health().await;
    }
    // A login hears why, within the backend's bound on a call.
    let err = replica.client().begin("github").await.unwrap_err();
    assert_error(&err, Code::Unavailable, "STATE_STORE_UNAVAILABLE");
    // Past the first readiness round (each probe fails as fast as that
    // call did), it is still NOT_SERVING: the database alone is not enough.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            replica.health().await,
            Some(ServingStatus::NotServing),
            "health while Redis is down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // And it still stops cleanly.
    replica.terminate();
    let status = replica.exited(EXIT_WITHIN).await;
    assert!(status.success(), "exit status {status}");
}
