//! Wiring: `Application::build` binds the listener, opens the store, builds
//! providers and services; `run_until_stopped` serves until the shutdown
//! future resolves, then drains in-flight calls.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use futures::StreamExt;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use crate::{
    admin::{AdminService, ProviderSummary},
    check,
    config::StateBackend,
    config::{Mode, Role, Settings},
    grpc::{
        self,
        admin::AdminApi,
        auth::{ApiKeys, Authenticated},
        health,
        limits::{CallLimits, Limited},
        login::LoginApi,
        observe::Observed,
        pb::{
            admin_service_server::AdminServiceServer,
            login_service_server::{LoginServiceServer, SERVICE_NAME},
        },
        socket::Socket,
    },
    http::HttpClient,
    login::{LoginParts, LoginService, bind_policies},
    metrics::MetricsServer,
    provider::Registry,
    sandbox::SandboxServer,
    state::{MemoryStateStore, PostgresStateStore, RedisStateStore, StateLimits, StateStore},
    store::{self, Database, Store},
    telemetry::cause_chain,
    tls::ServerTls,
    tokens::TokenService,
    vault::Vault,
};

/// Largest inbound message accepted. Field limits are far below this; it
/// only stops a client from making us buffer megabytes.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How often readiness re-checks the store and the state backend.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// How long Watch streams get to deliver NOT_SERVING before they close.
const WATCH_FLUSH: Duration = Duration::from_millis(200);
/// After `server.max_connection_age`, a connection's calls get
/// `server.request_timeout` plus this to end before it is closed; what is
/// still open then is a `Health/Watch` stream, which the client reopens on
/// a new connection.
const CONNECTION_AGE_SLACK: Duration = Duration::from_secs(5);
/// At most one warning per this long about connections refused for want
/// of a slot, however many there are.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Replaces a store by another that stands in front of it.
pub type Wrapper<S> = Box<dyn FnOnce(Arc<S>) -> Arc<S> + Send>;

/// Wrappers for the stores `Application::build_with` opens.
#[derive(Default)]
pub struct Wrap {
    pub store: Option<Wrapper<dyn Store>>,
    pub states: Option<Wrapper<dyn StateStore>>,
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    settings: Settings,
    login: Arc<LoginService>,
    admin: Arc<AdminService>,
    store: Arc<dyn Store>,
    states: Arc<dyn StateStore>,
    /// The same store when it is the memory backend, for the load generator.
    memory_states: Option<Arc<MemoryStateStore>>,
    sandbox: Option<SandboxServer>,
    stop_sandbox: watch::Sender<bool>,
    api_keys: ApiKeys,
    tls: Option<Arc<ServerTls>>,
    migrated: bool,
    /// `/metrics`, when `[metrics] listen` is set.
    metrics: Option<MetricsServer>,
}

impl Application {
    /// Everything that can fail on bad configuration fails here, before a
    /// single request is accepted.
    pub async fn build(settings: Settings, mode: Mode) -> anyhow::Result<Application> {
        Self::build_wrapped(settings, mode, Wrap::default()).await
    }

    /// `build`, with the stores passed through `wrap` first: tests put a
    /// fault injector between the service and the real stores.
    #[cfg(feature = "test-util")]
    pub async fn build_with(
        settings: Settings,
        mode: Mode,
        wrap: Wrap,
    ) -> anyhow::Result<Application> {
        Self::build_wrapped(settings, mode, wrap).await
    }

    async fn build_wrapped(
        settings: Settings,
        mode: Mode,
        wrap: Wrap,
    ) -> anyhow::Result<Application> {
        let problems = check::settings(&settings, mode);
        if !problems.is_empty() {
            anyhow::bail!("invalid configuration:\n  - {}", problems.join("\n  - "));
        }
        if mode == Mode::Dev && !settings.server.listen.ip().is_loopback() {
            anyhow::bail!(
                "dev runs without API keys and only listens on loopback; {} is not",
                settings.server.listen
            );
        }
        if settings.auth.api_keys.is_empty() {
            tracing::warn!("no API keys configured: every caller is trusted (development only)");
        }

        let tls = match &settings.server.tls {
            Some(tls) => Some(Arc::new(ServerTls::load(tls)?)),
            None => None,
        };
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.server.listen))?;
        let local_addr = listener.local_addr()?;

        let (stop_sandbox, stop_rx) = watch::channel(false);
        let sandbox = if Registry::uses_sandbox(&settings.providers) {
            let l = TcpListener::bind(settings.sandbox.listen)
                .await
                .with_context(|| {
                    format!("cannot listen on {} (sandbox)", settings.sandbox.listen)
                })?;
            let mut rx = stop_rx.clone();
            Some(SandboxServer::start(l, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })?)
        } else {
            None
        };

        let http = HttpClient::new(&settings.http).context("cannot build the HTTP client")?;
        let sandbox_base = sandbox.as_ref().map(SandboxServer::base_url);
        let registry =
            Registry::build(&settings.providers, &http, sandbox_base.as_ref()).map_err(|p| {
                anyhow::anyhow!("invalid provider configuration:\n  - {}", p.join("\n  - "))
            })?;

        let store = store::open(&settings.database.url, settings.database.pool_size)
            .await
            .context("cannot open the database")?;
        let store = match wrap.store {
            Some(wrap) => wrap(store),
            None => store,
        };
        // Migrate before accepting calls when we can; if the database is not
        // up yet, readiness keeps trying and health says NOT_SERVING meanwhile.
        let migrated = match store.migrate().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %cause_chain(&e), "cannot migrate the database yet; will retry");
                false
            }
        };
        let (states, memory_states) = open_state_store(&settings).await?;
        let states = match wrap.states {
            Some(wrap) => wrap(states),
            None => states,
        };
        let vault = Vault::from_settings(&settings.vault)
            .map_err(|p| anyhow::anyhow!("invalid vault configuration:\n  - {}", p.join("\n  - ")))?
            .map(Arc::new);
        let store_tokens = settings
            .providers
            .iter()
            .filter(|(_, p)| p.store_tokens)
            .map(|(n, _)| n.clone())
            .collect();
        let tokens = Arc::new(TokenService::new(
            store.clone(),
            store.clone(),
            store.clone(),
            vault,
            registry.clone(),
            store_tokens,
            settings.vault.refresh_skew,
        ));
        let policies = bind_policies(&settings);
        let summaries = summaries(&settings, &registry);
        let login = Arc::new(LoginService::new(LoginParts {
            providers: registry.clone(),
            states: states.clone(),
            bindings: store.clone(),
            audit: store.clone(),
            tokens: tokens.clone(),
            policies,
            settings: settings.login.clone(),
        }));
        let admin = Arc::new(AdminService::new(
            store.clone(),
            store.clone(),
            registry,
            summaries,
            states.clone(),
            tokens,
            &settings.auth.api_keys,
        ));
        let metrics = match settings.metrics.listen {
            Some(listen) => Some(
                MetricsServer::bind(
                    listen,
                    states.clone(),
                    store.clone(),
                    settings.login.max_pending,
                )
                .await?,
            ),
            None => None,
        };
        // dev is loopback-only and keyless by design (checked above).
        let api_keys = ApiKeys::new(
            &settings.auth.api_keys,
            &settings.auth.client_certs,
            settings.auth.allow_unauthenticated || mode == Mode::Dev,
        );
        Ok(Application {
            listener,
            local_addr,
            settings,
            login,
            admin,
            store,
            states,
            memory_states,
            sandbox,
            stop_sandbox,
            api_keys,
            tls,
            migrated,
            metrics,
        })
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `/metrics` is served, if `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Where the in-process sandbox provider listens, if one is configured.
    pub fn sandbox_url(&self) -> Option<url::Url> {
        self.sandbox.as_ref().map(SandboxServer::base_url)
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn state_store(&self) -> Arc<dyn StateStore> {
        self.states.clone()
    }

    /// The memory backend's own handle (housekeeping for measurements);
    /// `None` with a shared backend.
    pub fn memory_state_store(&self) -> Option<Arc<MemoryStateStore>> {
        self.memory_states.clone()
    }

    pub fn login_service(&self) -> Arc<LoginService> {
        self.login.clone()
    }

    /// Serves until `shutdown` resolves, then, in this order: health says
    /// NOT_SERVING (so load balancers stop sending calls), open
    /// `Health/Watch` streams get that status and are closed, the listener
    /// stops accepting, and in-flight calls get `server.shutdown_grace` to
    /// finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let reporter = HealthReporter::new();
        let (stopping_tx, stopping) = watch::channel(false);
        let (closing_tx, closing) = watch::channel(false);
        let health = HealthServer::new(health::Draining::new(
            HealthService::from_health_reporter(reporter.clone()),
            closing,
        ));
        set_serving(&reporter, false).await;
        let readiness = tokio::spawn(watch_readiness(
            self.store.clone(),
            self.states.clone(),
            reporter.clone(),
            self.migrated,
            stopping.clone(),
        ));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grpc::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        // grpcurl 1.8 only speaks v1alpha.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grpc::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let limits = &self.settings.server;
        // Authentication first, so a caller without a key never takes one
        // of the calls in progress.
        let calls = CallLimits::new(limits.max_concurrent_calls, limits.request_timeout);
        let login = LoginServiceServer::new(LoginApi::new(self.login.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let login = grpc::decode::DecodeErrors::new(login);
        let login = Limited::new(login, calls.clone());
        let login = Authenticated::new(login, self.api_keys.clone(), Role::Login);
        let login = Observed::new(login);
        let admin = AdminServiceServer::new(AdminApi::new(self.admin.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let admin = grpc::decode::DecodeErrors::new(admin);
        let admin = Limited::new(admin, calls);
        let admin = Authenticated::new(admin, self.api_keys.clone(), Role::Admin);
        let admin = Observed::new(admin);

        let (drained_tx, mut drained_rx) = watch::channel(false);
        // Scrapes go on while calls drain, and stop with the sandbox.
        let metrics = self.metrics.map(|m| {
            let mut stop = self.stop_sandbox.subscribe();
            m.run(async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })
        });
        let stop_reporter = reporter.clone();
        let server = Server::builder()
            // tonic's default is no limit, which lifts hyper's 200.
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .max_connection_age(limits.max_connection_age)
            .max_connection_age_grace(limits.request_timeout + CONNECTION_AGE_SLACK)
            .http2_max_header_list_size(limits.max_header_list_size)
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(login)
            .add_service(admin)
            .serve_with_incoming_shutdown(
                incoming(
                    self.listener,
                    self.tls.clone(),
                    self.settings.server.max_connections,
                ),
                async move {
                    shutdown.await;
                    tracing::info!("stopping: health is NOT_SERVING, draining calls");
                    // Readiness must not flip it back while we drain.
                    let _ = stopping_tx.send(true);
                    set_serving(&stop_reporter, false).await;
                    // tonic-health hands the change to every Watch stream;
                    // give them a moment to write it before they close.
                    tokio::time::sleep(WATCH_FLUSH).await;
                    let _ = closing_tx.send(true);
                    let _ = drained_tx.send(true);
                },
            );
        let grace = self.settings.server.shutdown_grace;
        tracing::info!(addr = %self.local_addr, state = self.states.backend(), "authbroker is listening");
        let result = tokio::select! {
            r = server => r.context("gRPC server failed"),
            _ = async {
                let _ = drained_rx.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "shutdown grace period over; dropping in-flight calls");
                Ok(())
            }
        };
        readiness.abort();
        let _ = self.stop_sandbox.send(true);
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        tracing::info!("authbroker stopped");
        result
    }
}

/// The accepted connections: TCP_NODELAY, each holding one of
/// `max_connections` slots until it closes (past them a connection is
/// closed at once), TLS when configured.
fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    max_connections: usize,
) -> impl futures::Stream<Item = std::io::Result<Socket>> {
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut last_warning: Option<std::time::Instant> = None;
    // Nagle's algorithm plus the client's delayed ACK stalls a response
    // sent in two writes by ~40 ms; tonic only sets TCP_NODELAY on sockets
    // it accepts itself, so ask for it here.
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .filter_map(move |accepted| {
            let next = match accepted {
                Err(e) => Some(Err(e)),
                Ok(tcp) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => Some(Ok(Socket::accept(tcp, tls.as_deref(), slot))),
                    Err(_) => {
                        if last_warning.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
                            last_warning = Some(std::time::Instant::now());
                            tracing::warn!(
                                max = max_connections,
                                "refusing connections: server.max_connections are open"
                            );
                        }
                        None
                    }
                },
            };
            std::future::ready(next)
        })
}

/// Opens the state backend `[state]` names. A shared backend that is down
/// at start is not fatal: readiness keeps trying and health says
/// NOT_SERVING meanwhile.
async fn open_state_store(
    settings: &Settings,
) -> anyhow::Result<(Arc<dyn StateStore>, Option<Arc<MemoryStateStore>>)> {
    let limits = StateLimits::from_settings(settings);
    let url = settings.state_url().unwrap_or_default();
    Ok(match settings.state.backend {
        StateBackend::Memory => {
            let memory = Arc::new(MemoryStateStore::new(limits));
            (memory.clone() as Arc<dyn StateStore>, Some(memory))
        }
        StateBackend::Postgres => {
            let store = PostgresStateStore::connect(url, settings.state.pool_size, limits)
                .context("cannot open the postgres state backend")?;
            (Arc::new(store) as Arc<dyn StateStore>, None)
        }
        StateBackend::Redis => {
            let store = RedisStateStore::lazy(url, &settings.state.key_prefix, limits)
                .context("cannot open the redis state backend")?;
            (Arc::new(store) as Arc<dyn StateStore>, None)
        }
    })
}

async fn set_serving(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// What `ListProviders` shows, disabled providers included.
fn summaries(settings: &Settings, registry: &Registry) -> Vec<ProviderSummary> {
    settings
        .providers
        .iter()
        .map(|(name, cfg)| {
            let policy = cfg.policy.unwrap_or(settings.login.policy).as_str();
            let mut summary = ProviderSummary {
                name: name.clone(),
                kind: cfg.kind.clone(),
                display_name: name.clone(),
                enabled: cfg.enabled,
                scopes: cfg.scopes.clone().unwrap_or_default(),
                allowed_scopes: cfg.allowed_scopes.clone(),
                redirect_uris: cfg.redirect_uris.clone(),
                pkce: false,
                refresh: false,
                revoke: false,
                policy: policy.to_string(),
                store_tokens: cfg.store_tokens,
            };
            if let Ok(p) = registry.get(name) {
                let info = p.info();
                summary.display_name = info.display_name.clone();
                summary.scopes = info.scopes.to_vec();
                summary.pkce = info.pkce;
                summary.refresh = p.refresher().is_some();
                summary.revoke = p.revoker().is_some();
            }
            summary
        })
        .collect()
}

/// Readiness follows both stores: NOT_SERVING until the database is
/// reachable and migrated and the state backend is prepared and answers,
/// and again whenever either stops answering; for good once stopping.
async fn watch_readiness(
    store: Arc<dyn Database>,
    states: Arc<dyn StateStore>,
    reporter: HealthReporter,
    mut migrated: bool,
    stopping: watch::Receiver<bool>,
) {
    let mut serving = false;
    let mut prepared = false;
    loop {
        let db = if migrated {
            store.ping().await
        } else {
            store.migrate().await.inspect(|_| migrated = true)
        };
        // Preparing may do nothing (redis, memory): ping in the same round,
        // so a backend that is down is never reported SERVING.
        let state = if prepared {
            states.ping().await
        } else {
            match states.prepare().await {
                Ok(()) => {
                    prepared = true;
                    states.ping().await
                }
                Err(e) => Err(e),
            }
        };
        let ready = match (&db, &state) {
            (Ok(()), Ok(())) => true,
            _ => {
                if serving || !migrated || !prepared {
                    if let Err(e) = &db {
                        tracing::warn!(error = %cause_chain(e), migrated, "store is not ready; not serving");
                    }
                    if let Err(e) = &state {
                        tracing::warn!(error = %cause_chain(e), backend = states.backend(), "state backend is not ready; not serving");
                    }
                }
                false
            }
        };
        if *stopping.borrow() {
            return;
        }
        if ready != serving {
            serving = ready;
            set_serving(&reporter, ready).await;
            if ready {
                tracing::info!(
                    state = states.backend(),
                    "store and state backend are ready; serving"
                );
            }
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}
