//! `[server.tls]`: TLS and mTLS on the gRPC listener, client certificates
//! that stand in for API keys, renewal without a restart, and
//! `authbroker healthcheck` over TLS.

use std::{
    net::SocketAddr,
    process::{Command, Output},
    sync::Arc,
    time::{Duration, Instant},
};

use authbroker::{
    app::Application,
    config::{ClientCertConfig, Mode, Role, Settings},
    grpc::pb::{self, login_service_client::LoginServiceClient},
    store::{AuditQuery, Store},
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::pki::Pki;
use crate::support::{LOGIN_KEY, assert_error, authed, browser, redirect_params};

/// An in-process authbroker on SQLite, listening on loopback port 0.
struct Served {
    addr: SocketAddr,
    store: Arc<dyn Store>,
    sandbox_url: url::Url,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start(configure: impl FnOnce(&mut Settings)) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::support::base_settings();
        settings.database.url = format!("sqlite://{}", dir.path().join("t.db").display());
        configure(&mut settings);
        let app = Application::build(settings, Mode::Serve)
            .await
            .expect("the application builds");
        let (addr, store) = (app.local_addr(), app.store());
        let sandbox_url = app.sandbox_url().expect("the sandbox runs");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Served {
            addr,
            store,
            sandbox_url,
            stop: Some(stop),
            handle: Some(handle),
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
    }
}

async fn health(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

/// Whether a connection attempt, or else a health check over it, failed:
/// a TLS 1.3 client may finish its handshake before the server refuses
/// its certificate.
async fn refused(connected: Result<Channel, tonic::transport::Error>) -> bool {
    match connected {
        Err(_) => true,
        Ok(channel) => health(channel).await.is_err(),
    }
}

fn begin() -> pb::BeginLoginRequest {
    pb::BeginLoginRequest {
        provider: "sandbox".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_a_client_that_trusts_the_ca_and_nobody_in_clear() {
    let pki = Pki::new();
    let served = Served::start(|s| s.server.tls = Some(pki.settings(false))).await;

    // A plaintext client gets no gRPC at all.
    let plain = Channel::from_shared(format!("http://{}", served.addr)).unwrap();
    assert!(refused(plain.connect().await).await);

    // A client that trusts another CA refuses the server.
    let stranger = Pki::new();
    assert!(refused(stranger.channel(served.addr, None).await).await);

    // The right CA: health, and a LoginService call with an API key.
    let channel = pki.channel(served.addr, None).await.expect("TLS connects");
    health(channel.clone()).await.unwrap();
    let begun = LoginServiceClient::new(channel.clone())
        .begin_login(authed(begin(), LOGIN_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(begun.authorize_url.starts_with(served.sandbox_url.as_str()));
    let e = LoginServiceClient::new(channel)
        .begin_login(Request::new(begin()))
        .await
        .unwrap_err();
    assert_error(&e, Code::Unauthenticated, "API_KEY_MISSING");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mtls_a_mapped_client_certificate_is_the_caller() {
    let pki = Pki::new();
    let served = Served::start(|s| {
        s.server.tls = Some(pki.settings(true));
        s.auth.client_certs = vec![ClientCertConfig {
            subject_cn: "web-frontend".into(),
            name: "frontend".into(),
            role: Role::Login,
            rate: None,
        }];
    })
    .await;

    // No client certificate, or one from another CA: no connection.
    assert!(
        refused(pki.channel(served.addr, None).await).await,
        "a client without a certificate is refused"
    );
    let stranger = Pki::new();
    let foreign = Some(stranger.client_identity("web-frontend"));
    assert!(
        refused(pki.channel(served.addr, foreign).await).await,
        "a certificate from another CA is refused"
    );

    // A certificate mapped to nothing: health, and calls with an API key.
    let unmapped = pki
        .channel(served.addr, Some(pki.client_identity("someone-else")))
        .await
        .unwrap();
    health(unmapped.clone()).await.unwrap();
    let e = LoginServiceClient::new(unmapped.clone())
        .begin_login(Request::new(begin()))
        .await
        .unwrap_err();
    let message = assert_error(&e, Code::Unauthenticated, "API_KEY_MISSING");
    assert!(message.contains("\"someone-else\""), "{message}");
    LoginServiceClient::new(unmapped)
        .begin_login(authed(begin(), LOGIN_KEY))
        .await
        .unwrap();

    // The mapped certificate logs in without a key; the audit actor is its name.
    let channel = pki
        .channel(served.addr, Some(pki.client_identity("web-frontend")))
        .await
        .unwrap();
    let mut client = LoginServiceClient::new(channel.clone());
    let begun = client.begin_login(begin()).await.unwrap().into_inner();
    let resp = browser()
        .get(format!("{}&sandbox_user=alice", begun.authorize_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let params = redirect_params(resp.headers()["location"].to_str().unwrap());
    let done = client
        .complete_login(pb::CompleteLoginRequest {
            state: params["state"].clone(),
            code: params["code"].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let user_id = done.binding.unwrap().user_id;
    let events = served
        .store
        .list_audit_events(&AuditQuery {
            user_id: Some(user_id),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!events.is_empty());
    assert!(
        events
            .iter()
            .all(|e| e.event.actor.as_deref() == Some("frontend")),
        "{events:?}"
    );

    // Its role is login: AdminService is not for it.
    let e = pb::admin_service_client::AdminServiceClient::new(channel)
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_error(&e, Code::PermissionDenied, "ROLE_NOT_ALLOWED");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let pki = Pki::new();
    let served = Served::start(|s| s.server.tls = Some(pki.settings(false))).await;
    assert_eq!(pki.served_serial(served.addr).await, "1");
    let channel = pki.channel(served.addr, None).await.unwrap();

    // Same paths, new key and certificate: new connections get it.
    pki.write_server_cert(2);
    let serial = until_served(&pki, served.addr, "2").await;
    assert_eq!(serial, "2");
    // The connection made before keeps working.
    health(channel).await.unwrap();

    // A broken certificate file is not used; the last good one stays.
    std::fs::write(
        pki.path("server.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    tokio::time::sleep(authbroker::tls::RELOAD_CHECK + Duration::from_millis(500)).await;
    assert_eq!(pki.served_serial(served.addr).await, "2");
    assert_eq!(pki.served_serial(served.addr).await, "2");
    health(pki.channel(served.addr, None).await.unwrap())
        .await
        .unwrap();

    // Mended: the next good pair is picked up.
    pki.write_server_cert(3);
    assert_eq!(until_served(&pki, served.addr, "3").await, "3");
    served.stop().await;
}

/// Connects anew until the server shows certificate `serial`, for at most
/// five reload periods; returns the last serial seen.
async fn until_served(pki: &Pki, addr: SocketAddr, serial: &str) -> String {
    let deadline = Instant::now() + authbroker::tls::RELOAD_CHECK * 5;
    loop {
        let seen = pki.served_serial(addr).await;
        if seen == serial || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `authbroker healthcheck` with this configuration file.
fn healthcheck(pki: &Pki, config: &str) -> Output {
    let path = pki.path("healthcheck.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_authbroker"))
        .args(["healthcheck", "--timeout", "5s", "--config"])
        .arg(&path)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_speaks_tls_and_mtls() {
    let pki = Pki::new();
    let served = Served::start(|s| s.server.tls = Some(pki.settings(true))).await;
    let (probe_cert, probe_key) = pki.write_client_cert("probe");
    let tls = format!(
        "[server]\nlisten = \"{addr}\"\n[server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n\
         client_ca_file = {ca:?}\n[server.tls.healthcheck]\nca_file = {server_ca:?}\n",
        addr = served.addr,
        cert = pki.path("server.crt"),
        key = pki.path("server.key"),
        ca = pki.path("client-ca.crt"),
        server_ca = pki.path("server-ca.crt"),
    );
    let with_cert = format!("{tls}cert_file = {probe_cert:?}\nkey_file = {probe_key:?}\n");

    // The probe's certificate (mapped to nothing: health needs no key).
    let out = tokio::task::spawn_blocking({
        let (pki_path, config) = (pki.path(""), with_cert.clone());
        move || healthcheck_until_serving_at(&pki_path, &config)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is SERVING"));

    // Without it, mTLS turns the probe away.
    let out = healthcheck(&pki, &tls);
    assert_eq!(out.status.code(), Some(1));

    // Trusting the wrong CA (the server's own certificate is not
    // self-signed), it refuses the server.
    let wrong = tls.replace(
        &format!("ca_file = {:?}", pki.path("server-ca.crt")),
        &format!("ca_file = {:?}", pki.path("client-ca.crt")),
    );
    let out = healthcheck(
        &pki,
        &format!("{wrong}cert_file = {probe_cert:?}\nkey_file = {probe_key:?}\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
    served.stop().await;
}

/// `healthcheck_until_serving` for a blocking thread, by directory.
fn healthcheck_until_serving_at(dir: &std::path::Path, config: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    let path = dir.join("healthcheck-serving.toml");
    std::fs::write(&path, config).unwrap();
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_authbroker"))
            .args(["healthcheck", "--timeout", "5s", "--config"])
            .arg(&path)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_trusts_a_self_signed_certificate_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("self.crt"), dir.path().join("self.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let settings = authbroker::config::TlsSettings {
        cert_file: cert.clone(),
        key_file: key.clone(),
        client_ca_file: None,
        healthcheck: Default::default(),
    };
    let served = Served::start(|s| s.server.tls = Some(settings)).await;
    let config = format!(
        "[server]\nlisten = \"{}\"\n[server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n",
        served.addr
    );
    let dir_path = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || healthcheck_until_serving_at(&dir_path, &config))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    served.stop().await;
}
