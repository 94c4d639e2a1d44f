//! The benchmark's own database: `authbroker_bench_<uuid>` on the given
//! server, created at the start and dropped at the end, so runs never see
//! each other's users.

use std::time::Duration;

use anyhow::{Context, anyhow};
use authbroker::config::redact_url;
use tokio_postgres::NoTls;
use url::Url;

/// A server that does not answer by then is reported as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct BenchDatabase {
    /// `postgres://…/authbroker_bench_<uuid>`, for the app's settings.
    pub url: String,
    name: String,
    admin_url: String,
}

impl BenchDatabase {
    pub async fn create(server_url: &str) -> anyhow::Result<BenchDatabase> {
        let (admin_url, url, name) = urls(server_url)?;
        let client = connect(&admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        Ok(BenchDatabase {
            url,
            name,
            admin_url,
        })
    }

    /// A session on the admin database that finds this database's backends.
    pub async fn backends(&self) -> anyhow::Result<crate::cpu::Backends> {
        let client = connect(&self.admin_url).await?;
        Ok(crate::cpu::Backends::new(client, self.name.clone()))
    }

    /// `WITH (FORCE)` (Postgres 13+) ends the sessions the app's pool may
    /// still hold; older servers get a plain DROP.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        let client = connect(&self.admin_url).await?;
        let forced = client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await;
        if forced.is_err() {
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\"", self.name))
                .await
                .with_context(|| format!("cannot drop database {}", self.name))?;
        }
        Ok(())
    }
}

/// (admin URL, benchmark database URL, benchmark database name). The server
/// URL's own database, or `postgres`, is the admin database.
fn urls(server_url: &str) -> anyhow::Result<(String, String, String)> {
    let server = Url::parse(server_url)
        .map_err(|e| anyhow!("--database-url {}: {e}", redact_url(server_url)))?;
    if !matches!(server.scheme(), "postgres" | "postgresql") {
        anyhow::bail!("--database-url must be a postgres:// URL (or use --sqlite)");
    }
    let admin_db = match server.path().trim_start_matches('/') {
        "" => "postgres".to_string(),
        db => db.to_string(),
    };
    let name = format!("authbroker_bench_{}", uuid::Uuid::new_v4().simple());
    let with_db = |db: &str| {
        let mut u = server.clone();
        u.set_path(&format!("/{db}"));
        u.to_string()
    };
    Ok((with_db(&admin_db), with_db(&name), name))
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let unreachable = || {
        format!(
            "cannot reach Postgres at {}: start a server, pass --database-url or set \
             TEST_DATABASE_URL to a server whose user may create databases, or use --sqlite",
            redact_url(url)
        )
    };
    let (client, connection) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
            .with_context(unreachable)?
            .with_context(unreachable)?;
    // The connection future drives the socket; it ends when `client` drops.
    tokio::spawn(connection);
    Ok(client)
}
