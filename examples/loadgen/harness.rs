//! The app under test: settings for a quiet in-process authbroker with the
//! sandbox provider, and a running instance with its gRPC channels.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use authbroker::{
    app::Application,
    config::{ApiKeyConfig, Mode, ProviderConfig, Role, Settings},
};
use sha2::{Digest, Sha256};
use tokio::{runtime::Handle, sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The one API key the load generator calls with (role `login`).
pub const API_KEY: &str = "loadgen-login-key-0123456789abcdef";
/// Never fetched: the sandbox only puts it in its 302 Location.
pub const REDIRECT_URI: &str = "https://app.example.com/oauth/callback";
/// The app migrates before serving; this only bounds a broken start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Port 0 on loopback, one login key, the sandbox provider, logs quiet.
pub fn settings(
    database_url: &str,
    pool_size: Option<usize>,
    max_pending: u64,
) -> anyhow::Result<Settings> {
    let mut s = Settings::default();
    s.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    s.server.shutdown_grace = Duration::from_secs(2);
    s.sandbox.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    s.database.url = database_url.to_string();
    if let Some(size) = pool_size {
        s.database.pool_size = size;
    }
    s.login.max_pending = max_pending;
    s.log.filter = "error".into();
    s.auth.api_keys = vec![ApiKeyConfig {
        name: "loadgen".into(),
        sha256: sha256_hex(API_KEY),
        role: Role::Login,
        rate: None,
    }];
    s.providers.insert("sandbox".into(), sandbox_provider()?);
    Ok(s)
}

/// Parsed as a config file would be, so fields added to `ProviderConfig`
/// later take their serde defaults here too.
fn sandbox_provider() -> anyhow::Result<ProviderConfig> {
    let table = format!(
        "kind = \"sandbox\"\nallow_sandbox = true\nclient_id = \"loadgen\"\n\
         redirect_uris = [\"{REDIRECT_URI}\"]\n"
    );
    toml::from_str(&table).context("the sandbox provider's configuration")
}

/// The runtimes besides the callers': the app's own, whose threads' CPU is
/// the server's, and the sandbox provider's.
#[derive(Clone)]
pub struct Runtimes {
    pub server: Handle,
    pub provider: Handle,
}

/// An app serving on its own runtime, and the channels callers share.
pub struct RunningApp {
    pub addr: SocketAddr,
    /// Where the sandbox provider listens.
    pub sandbox_port: Option<u16>,
    pub channels: Vec<Channel>,
    shutdown: oneshot::Sender<()>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    /// Built on the provider's runtime, where the app starts the sandbox's
    /// server task, and served on the server's: the app's database
    /// connections and provider HTTP connections are made while serving,
    /// so their tasks run there too.
    pub async fn start(
        settings: Settings,
        channels: usize,
        runtimes: &Runtimes,
    ) -> anyhow::Result<RunningApp> {
        let app = runtimes
            .provider
            .spawn(Application::build(settings, Mode::Serve))
            .await
            .context("the app's build task failed")?
            .context("cannot build the app")?;
        let addr = app.local_addr();
        let sandbox_port = app.sandbox_url().and_then(|u| u.port());
        let (shutdown, stopped) = oneshot::channel::<()>();
        let handle = runtimes.server.spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let mut opened = Vec::with_capacity(channels.max(1));
        for _ in 0..channels.max(1) {
            opened.push(connect(addr).await?);
        }
        let app = RunningApp {
            addr,
            sandbox_port,
            channels: opened,
            shutdown,
            handle,
        };
        app.wait_until_serving().await?;
        Ok(app)
    }

    /// Health says NOT_SERVING until the store is migrated and answering.
    async fn wait_until_serving(&self) -> anyhow::Result<()> {
        let mut health = HealthClient::new(self.channels[0].clone());
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let answer = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if let Ok(r) = &answer
                && r.get_ref().status() == ServingStatus::Serving
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "the app did not report SERVING within {READY_TIMEOUT:?}: {answer:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Graceful stop; a failure here does not change the measurements.
    pub async fn stop(self) {
        drop(self.channels);
        let _ = self.shutdown.send(());
        match tokio::time::timeout(Duration::from_secs(10), self.handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("loadgen: warning: the app stopped with: {e:#}"),
            Ok(Err(e)) => eprintln!("loadgen: warning: the app task failed: {e}"),
            Err(_) => eprintln!("loadgen: warning: the app did not stop within 10 s"),
        }
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))
        .context("endpoint URL")?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to the app at {addr}"))
}
