//! Wiring: `Application::build` binds the listener, opens the store, builds
//! providers and services; `run_until_stopped` serves until the shutdown
//! future resolves, then drains in-flight calls.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use futures::TryStreamExt;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    admin::{AdminService, ProviderSummary},
    config::{Mode, Role, Settings},
    grpc::{
        self,
        admin::AdminApi,
        auth::{ApiKeys, Authenticated},
        login::LoginApi,
        pb::{
            admin_service_server::AdminServiceServer,
            login_service_server::{LoginServiceServer, SERVICE_NAME},
        },
        socket::Socket,
    },
    http::HttpClient,
    login::{LoginParts, LoginService, bind_policies},
    provider::{Registry, sandbox::SandboxServer},
    state::{MemoryStateStore, StateStore},
    store::{self, Store},
    telemetry::cause_chain,
    tokens::TokenService,
    vault::Vault,
};

/// Largest inbound message accepted. Field limits are far below this; it
/// only stops a client from making us buffer megabytes.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How often readiness re-checks the store.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    settings: Settings,
    login: Arc<LoginService>,
    admin: Arc<AdminService>,
    store: Arc<dyn Store>,
    states: Arc<MemoryStateStore>,
    sandbox: Option<SandboxServer>,
    stop_sandbox: watch::Sender<bool>,
    api_keys: ApiKeys,
    migrated: bool,
}

impl Application {
    /// Everything that can fail on bad configuration fails here, before a
    /// single request is accepted.
    pub async fn build(settings: Settings, mode: Mode) -> anyhow::Result<Application> {
        let problems = settings.validate(mode);
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
        // Migrate before accepting calls when we can; if the database is not
        // up yet, readiness keeps trying and health says NOT_SERVING meanwhile.
        let migrated = match store.migrate().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %cause_chain(&e), "cannot migrate the database yet; will retry");
                false
            }
        };
        // Entries outlive their TTL by one more TTL so a late callback is
        // told "expired" rather than "unknown".
        let states = Arc::new(MemoryStateStore::new(
            settings.login.max_pending,
            settings.login.state_ttl,
        ));
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
            vault,
            registry.clone(),
            store_tokens,
            settings.vault.refresh_skew,
        ));
        let policies = bind_policies(&settings);
        let summaries = summaries(&settings, &registry);
        let login = Arc::new(LoginService::new(LoginParts {
            providers: registry.clone(),
            states: states.clone() as Arc<dyn StateStore>,
            store: store.clone(),
            tokens: tokens.clone(),
            policies,
            settings: settings.login.clone(),
        }));
        let admin = Arc::new(AdminService::new(
            store.clone(),
            registry,
            summaries,
            states.clone() as Arc<dyn StateStore>,
            tokens,
        ));
        // dev is loopback-only and keyless by design (checked above).
        let api_keys = ApiKeys::new(
            &settings.auth.api_keys,
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
            sandbox,
            stop_sandbox,
            api_keys,
            migrated,
        })
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the in-process sandbox provider listens, if one is configured.
    pub fn sandbox_url(&self) -> Option<url::Url> {
        self.sandbox.as_ref().map(SandboxServer::base_url)
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn state_store(&self) -> Arc<MemoryStateStore> {
        self.states.clone()
    }

    pub fn login_service(&self) -> Arc<LoginService> {
        self.login.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and gives
    /// in-flight calls `server.shutdown_grace` to finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;
        let readiness = tokio::spawn(watch_store(self.store.clone(), reporter, self.migrated));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grpc::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        // grpcurl 1.8 only speaks v1alpha.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grpc::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let login = LoginServiceServer::new(LoginApi::new(self.login.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let login = Authenticated::new(login, self.api_keys.clone(), Role::Login);
        let admin = AdminServiceServer::new(AdminApi::new(self.admin.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let admin = Authenticated::new(admin, self.api_keys.clone(), Role::Admin);

        let (signalled_tx, mut signalled_rx) = watch::channel(false);
        let server = Server::builder()
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(login)
            .add_service(admin)
            // Nagle's algorithm plus the client's delayed ACK stalls a
            // response sent in two writes by ~40 ms; tonic only sets
            // TCP_NODELAY on sockets it accepts itself, so ask for it here.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.listener)
                    .with_nodelay(Some(true))
                    .map_ok(Socket::from),
                async move {
                    shutdown.await;
                    let _ = signalled_tx.send(true);
                },
            );
        let grace = self.settings.server.shutdown_grace;
        tracing::info!(addr = %self.local_addr, "authbroker is listening");
        let result = tokio::select! {
            r = server => r.context("gRPC server failed"),
            _ = async {
                let _ = signalled_rx.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "shutdown grace period over; dropping in-flight calls");
                Ok(())
            }
        };
        readiness.abort();
        let _ = self.stop_sandbox.send(true);
        tracing::info!("authbroker stopped");
        result
    }
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

/// Readiness follows the store: NOT_SERVING until it is reachable and
/// migrated, and again whenever it stops answering.
async fn watch_store(store: Arc<dyn Store>, reporter: HealthReporter, mut migrated: bool) {
    let mut serving = false;
    loop {
        let ok = if migrated {
            store.ping().await
        } else {
            store.migrate().await.inspect(|_| migrated = true)
        };
        match ok {
            Ok(()) if !serving => {
                serving = true;
                reporter
                    .set_service_status("", ServingStatus::Serving)
                    .await;
                reporter
                    .set_service_status(SERVICE_NAME, ServingStatus::Serving)
                    .await;
                tracing::info!("store is ready; serving");
            }
            Ok(()) => {}
            Err(e) => {
                if serving || !migrated {
                    tracing::warn!(error = %cause_chain(&e), migrated, "store is not ready; not serving");
                }
                if serving {
                    serving = false;
                    reporter
                        .set_service_status("", ServingStatus::NotServing)
                        .await;
                    reporter
                        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                        .await;
                }
            }
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}
