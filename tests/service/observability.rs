//! `/metrics` after real logins over real gRPC, and traces: spans that
//! reach an OTLP receiver under the caller's trace id, and log lines that
//! carry the call's trace or request id.
//!
//! The metrics recorder is global to the test binary, so these tests use
//! provider names of their own and check the series labelled with them
//! exactly; series every test touches (RPCs, key checks) only grow.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use authbroker::{
    config::{LogFormat, LogSettings, Policy, TracingSettings},
    grpc::pb,
    telemetry::{self, TraceExport},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value,
};
use prost::Message;
use tonic::{Code, Request};
use tracing_subscriber::fmt::MakeWriter;

use crate::support::{
    LOGIN_KEY, TestApp, assert_error, authed, browser, provider, redirect_params, spawn_app,
};

/// A caller's W3C trace context: version, trace id, parent span id, sampled.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")
}

/// `req` with an API key and, when given, a `traceparent`.
fn call<T>(msg: T, traceparent: Option<&str>) -> Request<T> {
    let mut r = authed(msg, LOGIN_KEY);
    if let Some(tp) = traceparent {
        r.metadata_mut().insert("traceparent", tp.parse().unwrap());
    }
    r
}

/// One login at `provider` (a sandbox) as `user`, all of it under
/// `traceparent` if given; returns the answer and the state it used.
async fn login_at(
    app: &TestApp,
    provider: &str,
    user: &str,
    traceparent: Option<&str>,
) -> (pb::CompleteLoginResponse, String) {
    let begun = app
        .client()
        .begin_login(call(
            pb::BeginLoginRequest {
                provider: provider.into(),
                ..Default::default()
            },
            traceparent,
        ))
        .await
        .expect("BeginLogin succeeds")
        .into_inner();
    let (code, state) = app.sandbox_authorize(&begun.authorize_url, user).await;
    let done = app
        .client()
        .complete_login(call(
            pb::CompleteLoginRequest {
                state: state.clone(),
                code,
                ..Default::default()
            },
            traceparent,
        ))
        .await
        .expect("CompleteLogin succeeds")
        .into_inner();
    (done, state)
}

async fn complete(app: &TestApp, req: pb::CompleteLoginRequest, tp: Option<&str>) -> tonic::Status {
    app.client()
        .complete_login(call(req, tp))
        .await
        .expect_err("CompleteLogin fails")
}

// ---------------------------------------------------------------- metrics

/// Samples of a Prometheus text page, by name and sorted labels.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    async fn of(addr: SocketAddr) -> Scrape {
        let resp = browser()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        Scrape::parse(&resp.text().await.unwrap())
    }

    fn parse(text: &str) -> Scrape {
        let mut samples = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let key = match series.split_once('{') {
                None => series.to_string(),
                Some((name, labels)) => {
                    let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                    labels.sort_unstable();
                    format!("{name}{{{}}}", labels.join(","))
                }
            };
            samples.insert(key, value.parse().unwrap());
        }
        Scrape(samples)
    }

    /// The sample of `name` with exactly `labels` (any order).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        labels.sort_unstable();
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{}}}", labels.join(","))
        };
        self.0.get(&key).copied()
    }

    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }
}

#[tokio::test]
async fn metrics_count_real_logins_failures_and_refusals() {
    let app_settings = |s: &mut authbroker::config::Settings| {
        s.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        s.providers
            .insert("metered".into(), provider("sandbox", "", ""));
        let mut linked = provider("sandbox", "", "");
        linked.policy = Some(Policy::LinkRequired);
        s.providers.insert("metered_link".into(), linked);
    };
    let (app, metrics) = spawn_with_metrics(app_settings).await;

    // Off by default: nothing else listens for it.
    assert!(
        authbroker::config::Settings::default()
            .metrics
            .listen
            .is_none()
    );

    let (first, replayed_state) = login_at(&app, "metered", "alice", None).await;
    assert_eq!(first.outcome(), pb::Outcome::UserCreated);
    let (again, _) = login_at(&app, "metered", "alice", None).await;
    assert_eq!(again.outcome(), pb::Outcome::SignedIn);
    let (linking, _) = login_at(&app, "metered_link", "bob", None).await;
    assert_eq!(linking.outcome(), pb::Outcome::LinkRequired);

    // A replayed callback: the state is already used, its provider no
    // longer known.
    let replay = complete(
        &app,
        pb::CompleteLoginRequest {
            state: replayed_state,
            code: "whatever".into(),
            ..Default::default()
        },
        None,
    )
    .await;
    assert_error(&replay, Code::FailedPrecondition, "STATE_ALREADY_USED");
    // A denial at the provider.
    let begun = app.begin_with("metered").await;
    let resp = browser()
        .get(format!("{}&sandbox_deny=1", begun.authorize_url))
        .send()
        .await
        .unwrap();
    let params = redirect_params(resp.headers()["location"].to_str().unwrap());
    let denied = complete(
        &app,
        pb::CompleteLoginRequest {
            state: params["state"].clone(),
            error: params["error"].clone(),
            ..Default::default()
        },
        None,
    )
    .await;
    assert_error(&denied, Code::FailedPrecondition, "ACCESS_DENIED");
    // A state nobody issued, twice.
    for _ in 0..2 {
        let unknown = complete(
            &app,
            pb::CompleteLoginRequest {
                state: "A".repeat(43),
                code: "c".into(),
                ..Default::default()
            },
            None,
        )
        .await;
        assert_error(&unknown, Code::NotFound, "STATE_UNKNOWN");
    }
    // A wrong key and no key.
    let wrong = app
        .client()
        .begin_login(authed(
            pb::BeginLoginRequest {
                provider: "metered".into(),
                ..Default::default()
            },
            "not-a-key-of-ours",
        ))
        .await
        .unwrap_err();
    assert_error(&wrong, Code::Unauthenticated, "API_KEY_INVALID");
    // One pending login stays behind.
    app.begin_with("metered").await;

    // The rpc's record is written when its response body is done with.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = Scrape::of(metrics).await;
    let logins = "authbroker_logins_total";
    assert_eq!(
        m.value(
            logins,
            &[("provider", "metered"), ("outcome", "user_created")]
        ),
        1.0
    );
    assert_eq!(
        m.value(logins, &[("provider", "metered"), ("outcome", "signed_in")]),
        1.0
    );
    assert_eq!(
        m.value(
            logins,
            &[("provider", "metered_link"), ("outcome", "link_required")]
        ),
        1.0
    );
    let failures = "authbroker_login_failures_total";
    assert_eq!(
        m.value(
            failures,
            &[("provider", "metered"), ("reason", "ACCESS_DENIED")]
        ),
        1.0
    );
    // Shared with other tests: at least ours.
    assert!(
        m.value(
            failures,
            &[("provider", "none"), ("reason", "STATE_UNKNOWN")]
        ) >= 2.0
    );
    assert!(
        m.value(
            failures,
            &[("provider", "none"), ("reason", "STATE_ALREADY_USED")]
        ) >= 1.0
    );

    // Three code exchanges and three profile requests, all answered.
    let provider_calls = "authbroker_provider_request_seconds_count";
    for (provider, n) in [("metered", 2.0), ("metered_link", 1.0)] {
        for step in ["token", "userinfo"] {
            let labels = [("provider", provider), ("step", step), ("result", "ok")];
            assert_eq!(m.value(provider_calls, &labels), n, "{provider} {step}");
        }
    }
    // A histogram, with buckets, for p99 alerts.
    assert!(
        m.get(
            "authbroker_provider_request_seconds_bucket",
            &[
                ("provider", "metered"),
                ("step", "token"),
                ("result", "ok"),
                ("le", "+Inf")
            ]
        )
        .is_some()
    );

    let rpcs = "authbroker_grpc_requests_total";
    assert!(m.value(rpcs, &[("method", "CompleteLogin"), ("code", "OK")]) >= 3.0);
    assert!(m.value(rpcs, &[("method", "CompleteLogin"), ("code", "NOT_FOUND")]) >= 2.0);
    assert!(
        m.value(
            rpcs,
            &[("method", "CompleteLogin"), ("code", "FAILED_PRECONDITION")]
        ) >= 2.0
    );
    assert!(
        m.value(
            rpcs,
            &[("method", "BeginLogin"), ("code", "UNAUTHENTICATED")]
        ) >= 1.0
    );
    assert!(
        m.value(
            "authbroker_grpc_request_seconds_count",
            &[("method", "BeginLogin")]
        ) >= 5.0
    );
    assert!(
        m.value(
            "authbroker_auth_failures_total",
            &[("reason", "API_KEY_INVALID")]
        ) >= 1.0
    );

    // This app's memory backend holds the one login left pending; its
    // bound is shown beside it.
    assert!(m.value("authbroker_pending_logins", &[("backend", "memory")]) >= 1.0);
    assert!(m.value("authbroker_pending_logins_max", &[("backend", "memory")]) >= 1.0);
    // The Postgres store's pool.
    assert!(m.value("authbroker_db_pool_connections", &[("state", "max")]) >= 1.0);
    for state in ["open", "idle", "in_use"] {
        assert!(
            m.get("authbroker_db_pool_connections", &[("state", state)])
                .is_some()
        );
    }

    // No label carries what a caller sent: not the states, codes or the
    // unknown state, nor the users' names.
    for series in m.0.keys() {
        for secret in ["AAAAAAAAAAAAAAAAAAAA", "alice", "bob", "not-a-key"] {
            assert!(!series.contains(secret), "{series}");
        }
    }
    app.stop().await;
}

/// `spawn_app` on a metrics listener of its own; returns where `/metrics` is.
pub(crate) async fn spawn_with_metrics(
    configure: impl FnOnce(&mut authbroker::config::Settings),
) -> (TestApp, SocketAddr) {
    // Port 0 would hide the address inside the app; take a free port and
    // hand it over (nothing else in this process binds it meanwhile).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = spawn_app(|s| {
        configure(s);
        s.metrics.listen = Some(port);
    })
    .await;
    (app, port)
}

// ----------------------------------------------------------------- traces

/// A span as the receiver got it.
#[derive(Clone, Debug)]
struct Received {
    trace_id: String,
    parent_span_id: String,
    name: String,
    attributes: HashMap<String, String>,
}

/// A minimal OTLP/HTTP collector: `/v1/traces` with protobuf bodies, on a
/// thread and runtime of its own, so that an exporter flushing from the
/// test's thread does not wait on the thread it blocks.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    fn start() -> Collector {
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let kept = spans.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let router = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let kept = kept.clone();
                        async move {
                            let request = ExportTraceServiceRequest::decode(body).unwrap();
                            kept.lock().unwrap().extend(received(request));
                            // An empty ExportTraceServiceResponse.
                            (
                                [("content-type", "application/x-protobuf")],
                                Vec::<u8>::new(),
                            )
                        }
                    }),
                );
                axum::serve(listener, router).await.unwrap();
            });
        });
        Collector {
            addr: rx.recv().unwrap(),
            spans,
        }
    }

    fn settings(&self) -> TracingSettings {
        TracingSettings {
            otlp_endpoint: Some(format!("http://{}", self.addr).parse().unwrap()),
            ..Default::default()
        }
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

fn received(request: ExportTraceServiceRequest) -> Vec<Received> {
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut out = Vec::new();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            for span in scope.spans {
                let attributes = span
                    .attributes
                    .iter()
                    .filter_map(|kv| {
                        let value = match kv.value.as_ref()?.value.as_ref()? {
                            any_value::Value::StringValue(s) => s.clone(),
                            any_value::Value::IntValue(i) => i.to_string(),
                            any_value::Value::BoolValue(b) => b.to_string(),
                            other => format!("{other:?}"),
                        };
                        Some((kv.key.clone(), value))
                    })
                    .collect();
                out.push(Received {
                    trace_id: hex(&span.trace_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    attributes,
                });
            }
        }
    }
    out
}

/// Log lines written by the subscriber under test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn text_logs() -> LogSettings {
    LogSettings {
        format: LogFormat::Text,
        filter: "debug".into(),
    }
}

/// The subscriber `serve` installs, for this thread only: every task of
/// a current-thread test runtime runs on it.
fn install(export: Option<&TraceExport>) -> (Captured, tracing::subscriber::DefaultGuard) {
    let logs = Captured::default();
    let subscriber = telemetry::subscriber(&text_logs(), export, logs.clone(), false);
    // While a single dispatcher is registered, tracing decides whether a
    // callsite is wanted by asking the default of the thread that reaches
    // it first, and keeps the answer: a test on another thread, where
    // there is none, would switch our spans off for good. A second one,
    // kept for the whole run, makes it ask every registered dispatcher.
    static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    let guard = tracing::subscriber::set_default(subscriber);
    (logs, guard)
}

#[tokio::test(flavor = "current_thread")]
async fn spans_reach_the_collector_under_the_callers_trace() {
    let collector = Collector::start();
    let export = TraceExport::start(&collector.settings())
        .unwrap()
        .expect("an endpoint is configured");
    let (logs, _guard) = install(Some(&export));
    let app = spawn_app(|_| {}).await;
    let tp = traceparent();

    let (_, used_state) = login_at(&app, "sandbox", "alice", Some(&tp)).await;
    // A replay under the same trace: refused, and logged as such.
    let replay = complete(
        &app,
        pb::CompleteLoginRequest {
            state: used_state,
            code: "again".into(),
            ..Default::default()
        },
        Some(&tp),
    )
    .await;
    assert_error(&replay, Code::FailedPrecondition, "STATE_ALREADY_USED");
    // A call of no trace starts one of its own.
    app.begin_with("sandbox").await;

    // Spans end when their response bodies are done with.
    tokio::time::sleep(Duration::from_millis(200)).await;
    export.flush();
    let spans = collector.spans();
    let ours: Vec<&Received> = spans
        .iter()
        .filter(|s| s.trace_id == CALLER_TRACE)
        .collect();
    let names: Vec<&str> = ours.iter().map(|s| s.name.as_str()).collect();

    // Each RPC is a child of the caller's span.
    for rpc in ["BeginLogin", "CompleteLogin"] {
        let name = format!("authbroker.v1.LoginService/{rpc}");
        let span = ours
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span under the caller's trace: {names:?}"));
        assert_eq!(span.parent_span_id, CALLER_SPAN);
        assert_eq!(span.attributes["rpc.method"], rpc);
        assert_eq!(span.attributes["rpc.system"], "grpc");
    }
    let codes: Vec<&str> = ours
        .iter()
        .filter(|s| s.name.ends_with("/CompleteLogin"))
        .map(|s| s.attributes["rpc.grpc.status_code"].as_str())
        .collect();
    assert!(
        codes.contains(&"OK") && codes.contains(&"FAILED_PRECONDITION"),
        "{codes:?}"
    );
    // The provider's HTTP calls, inside CompleteLogin.
    for step in ["token", "userinfo"] {
        let span = ours
            .iter()
            .find(|s| s.name == format!("sandbox {step}"))
            .unwrap_or_else(|| panic!("no {step} span: {names:?}"));
        assert_eq!(span.attributes["result"], "ok");
        assert_ne!(span.parent_span_id, CALLER_SPAN);
    }
    // The store's transactions.
    assert!(
        ours.iter().any(|s| s.name.starts_with("store ")),
        "no store span: {names:?}"
    );
    // The call without a traceparent is a trace of its own.
    let own: Vec<&Received> = spans
        .iter()
        .filter(|s| s.name.ends_with("/BeginLogin") && s.trace_id != CALLER_TRACE)
        .collect();
    assert_eq!(own.len(), 1, "{spans:?}");
    assert!(own[0].parent_span_id.is_empty());

    // Every log line of a call carries its trace id.
    let lines = logs.lines();
    let refused: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("STATE_ALREADY_USED"))
        .collect();
    assert!(!refused.is_empty(), "the refusal is logged");
    for line in lines.iter().filter(|l| l.contains("rpc{")) {
        assert!(line.contains("trace_id="), "{line}");
    }
    for line in refused {
        assert!(line.contains(&format!("trace_id={CALLER_TRACE}")), "{line}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn without_export_log_lines_carry_the_callers_trace_or_a_request_id() {
    let (logs, _guard) = install(None);
    let app = spawn_app(|_| {}).await;
    let unknown = |tag: &str| pb::CompleteLoginRequest {
        state: format!("{}A", tag.repeat(42)),
        code: "c".into(),
        ..Default::default()
    };
    let tp = traceparent();
    let traced = complete(&app, unknown("B"), Some(&tp)).await;
    assert_error(&traced, Code::NotFound, "STATE_UNKNOWN");
    let untraced = complete(&app, unknown("C"), None).await;
    assert_error(&untraced, Code::NotFound, "STATE_UNKNOWN");
    // A traceparent that is not one is no trace.
    let garbled = complete(&app, unknown("D"), Some("00-nonsense-01")).await;
    assert_error(&garbled, Code::NotFound, "STATE_UNKNOWN");
    app.stop().await;

    let refusals: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("STATE_UNKNOWN"))
        .collect();
    assert_eq!(refusals.len(), 3, "{refusals:#?}");
    assert!(
        refusals[0].contains(&format!("trace_id={CALLER_TRACE}")),
        "{}",
        refusals[0]
    );
    let request_ids: Vec<&str> = refusals[1..]
        .iter()
        .map(|l| {
            assert!(!l.contains("trace_id="), "{l}");
            let id = l.split("request_id=").nth(1).expect("a request id");
            &id[..32]
        })
        .collect();
    assert_ne!(request_ids[0], request_ids[1], "each call has its own");
}

#[test]
fn the_otlp_endpoint_must_be_http() {
    let mut s = crate::support::base_settings();
    s.database.url = "sqlite::memory:".into();
    s.tracing.otlp_endpoint = Some("grpc://collector:4317".parse().unwrap());
    let problems = s.validate(authbroker::config::Mode::Serve);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("tracing.otlp_endpoint")),
        "{problems:?}"
    );
    s.tracing.otlp_endpoint = Some("http://collector:4318".parse().unwrap());
    assert!(s.validate(authbroker::config::Mode::Serve).is_empty());
}
