//! Prometheus metrics: what is recorded, and `/metrics` on a listener of
//! its own (`[metrics] listen`). Without that setting no recorder is
//! installed and every `metrics::` call in the crate costs next to nothing.
//!
//! Labels only ever take values from bounded sets: provider names from the
//! configuration, steps, outcomes and reasons from fixed lists, RPC names
//! from the service descriptors. Nothing a caller sends becomes a label
//! value, so a client cannot grow the series without end.
//!
//! The recorder is process-wide (the `metrics` facade has one global), so
//! several `Application`s in one process (tests) share it.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context;
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{domain::Outcome, state::StateStore, store::Store, telemetry::cause_chain};

pub const LOGINS: &str = "authbroker_logins_total";
pub const LOGIN_FAILURES: &str = "authbroker_login_failures_total";
pub const PROVIDER_REQUEST_SECONDS: &str = "authbroker_provider_request_seconds";
pub const GRPC_REQUESTS: &str = "authbroker_grpc_requests_total";
pub const GRPC_REQUEST_SECONDS: &str = "authbroker_grpc_request_seconds";
pub const PENDING_LOGINS: &str = "authbroker_pending_logins";
pub const PENDING_LOGINS_MAX: &str = "authbroker_pending_logins_max";
pub const DB_POOL_CONNECTIONS: &str = "authbroker_db_pool_connections";
pub const AUTH_FAILURES: &str = "authbroker_auth_failures_total";

/// Histogram buckets for every `_seconds` metric: from a cached BeginLogin
/// (well under a millisecond) to a provider at the HTTP client's timeout.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// How long a scrape waits for the state backend's count before it shows
/// the last one: a scrape must answer even while Redis is down.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The label for a login that ended before its provider was known (its
/// state was unknown, expired or used).
pub const NO_PROVIDER: &str = "none";

/// A login that reached its binding decision.
pub fn login_completed(provider: &str, outcome: Outcome) {
    let outcome = match outcome {
        Outcome::SignedIn => "signed_in",
        Outcome::UserCreated => "user_created",
        Outcome::LinkRequired => "link_required",
    };
    ::metrics::counter!(LOGINS, "provider" => provider.to_string(), "outcome" => outcome)
        .increment(1);
}

/// A CompleteLogin that failed with `reason` (the `ErrorInfo` reason).
/// Unknown, expired and reused states are counted here under
/// [`NO_PROVIDER`]: a burst of `STATE_UNKNOWN` is someone guessing.
pub fn login_failed(provider: Option<&str>, reason: &'static str) {
    let provider = provider.unwrap_or(NO_PROVIDER).to_string();
    ::metrics::counter!(LOGIN_FAILURES, "provider" => provider, "reason" => reason).increment(1);
}

/// One HTTP request to a provider. `step` and `result` come from fixed
/// sets (`provider::observe`).
pub fn provider_request(
    provider: &str,
    step: &'static str,
    result: &'static str,
    elapsed: Duration,
) {
    ::metrics::histogram!(
        PROVIDER_REQUEST_SECONDS,
        "provider" => provider.to_string(),
        "step" => step,
        "result" => result,
    )
    .record(elapsed.as_secs_f64());
}

/// One LoginService or AdminService call, with its gRPC status name.
pub fn grpc_call(method: &'static str, code: &'static str, elapsed: Duration) {
    ::metrics::counter!(GRPC_REQUESTS, "method" => method, "code" => code).increment(1);
    ::metrics::histogram!(GRPC_REQUEST_SECONDS, "method" => method).record(elapsed.as_secs_f64());
}

/// A call refused before it reached a service: a missing or unknown key, a
/// role that may not, a caller over its rate.
pub fn auth_failed(reason: &'static str) {
    ::metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

/// The process-wide Prometheus recorder, installed on first use.
fn recorder() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    // Two racing first callers: the loser's recorder is dropped and both
    // use the one that was installed.
    if HANDLE.set(handle).is_ok() {
        ::metrics::set_global_recorder(recorder)
            .context("another metrics recorder is already installed")?;
        describe();
    }
    HANDLE
        .get()
        .cloned()
        .context("the metrics recorder was not kept")
}

/// The `# HELP` lines.
fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        LOGINS,
        "Completed logins by provider and outcome (signed_in, user_created, link_required)."
    );
    describe_counter!(
        LOGIN_FAILURES,
        "Failed CompleteLogin calls by provider and error reason."
    );
    describe_histogram!(
        PROVIDER_REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP requests to providers by step and result."
    );
    describe_counter!(
        GRPC_REQUESTS,
        "LoginService and AdminService calls by method and gRPC status."
    );
    describe_histogram!(
        GRPC_REQUEST_SECONDS,
        Unit::Seconds,
        "LoginService and AdminService call latency by method."
    );
    describe_gauge!(
        PENDING_LOGINS,
        "Pending or claimed logins and link tickets held by the state backend."
    );
    describe_gauge!(
        PENDING_LOGINS_MAX,
        "login.max_pending: the bound on authbroker_pending_logins."
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "Database pool connections: max, open, idle and in_use."
    );
    describe_counter!(AUTH_FAILURES, "Calls refused by authentication, by reason.");
    describe_histogram!(
        "authbroker_login_phase_seconds",
        Unit::Seconds,
        "CompleteLogin's phases: state, exchange, identity, store."
    );
    describe_histogram!(
        "authbroker_token_refresh_seconds",
        Unit::Seconds,
        "Provider token refreshes by provider."
    );
}

/// What a scrape samples at the moment it is asked: gauges that are
/// cheaper to read than to keep current on every call.
#[derive(Clone)]
struct Sampled {
    handle: PrometheusHandle,
    states: Arc<dyn StateStore>,
    store: Arc<dyn Store>,
}

/// `/metrics` on its bound listener, until `run` is told to stop.
pub struct MetricsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    sampled: Sampled,
}

impl MetricsServer {
    /// Installs the recorder (once per process) and binds `listen`.
    pub async fn bind(
        listen: SocketAddr,
        states: Arc<dyn StateStore>,
        store: Arc<dyn Store>,
        max_pending: u64,
    ) -> anyhow::Result<MetricsServer> {
        let handle = recorder()?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (metrics)"))?;
        let local_addr = listener.local_addr()?;
        ::metrics::gauge!(PENDING_LOGINS_MAX, "backend" => states.backend())
            .set(max_pending as f64);
        Ok(MetricsServer {
            listener,
            local_addr,
            sampled: Sampled {
                handle,
                states,
                store,
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves.
    pub fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
        let router = Router::new()
            .route("/metrics", get(scrape))
            .with_state(self.sampled);
        let listener = self.listener;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %cause_chain(&e), "the metrics listener failed");
            }
        })
    }
}

async fn scrape(State(sampled): State<Sampled>) -> impl IntoResponse {
    let backend = sampled.states.backend();
    match tokio::time::timeout(SAMPLE_TIMEOUT, sampled.states.held()).await {
        Ok(Ok(held)) => ::metrics::gauge!(PENDING_LOGINS, "backend" => backend).set(held as f64),
        Ok(Err(e)) => {
            tracing::debug!(error = %cause_chain(&e), "metrics: cannot count pending logins")
        }
        Err(_) => tracing::debug!("metrics: counting pending logins timed out"),
    }
    if let Some(pool) = sampled.store.pool_status() {
        let in_use = pool.open.saturating_sub(pool.idle);
        for (state, n) in [
            ("max", pool.max),
            ("open", pool.open),
            ("idle", pool.idle),
            ("in_use", in_use),
        ] {
            ::metrics::gauge!(DB_POOL_CONNECTIONS, "state" => state).set(n as f64);
        }
    }
    // Histograms keep their samples until upkeep folds them in.
    sampled.handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        sampled.handle.render(),
    )
}
