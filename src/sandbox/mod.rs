//! The sandbox: a small but real OAuth2 authorization server (authorize
//! page, code + PKCE S256 token exchange, userinfo) that `authbroker dev`
//! runs in-process so a login can finish with no external provider. The
//! client side is an ordinary preset (`providers/sandbox.toml`); nothing here
//! knows the `provider` module. Anyone may sign in as any test user: it must
//! never face the internet.
//!
//! - [`grants`]: the codes and tokens it has issued, and their lifetimes.
//! - [`authorize`]: `GET /authorize`, the request's checks and the redirect.
//! - [`pages`]: the HTML it shows (consent picker, error page).
//! - [`token`]: `POST /token`, client authentication, code and refresh grants.
//! - [`profile`]: `GET /userinfo` and the test users' avatars.

mod authorize;
mod grants;
mod pages;
mod profile;
mod token;

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
};
use url::Url;

use grants::Sandbox;

/// Requests served at once. The sandbox is for development, but `serve` runs
/// it when `allow_sandbox` is set, so its listener is bounded like the gRPC
/// one: past this a request is answered 503 at once instead of queueing.
const MAX_CONCURRENT_REQUESTS: usize = 256;
/// Longest a request may take; its handlers are in-memory steps.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A running sandbox provider. The server task lives until the `shutdown`
/// future given to [`SandboxServer::start`] resolves.
#[derive(Debug, Clone)]
pub struct SandboxServer {
    base_url: Url,
}

impl SandboxServer {
    /// Serves on an already-bound listener until `shutdown` resolves.
    /// Must be called from within a Tokio runtime (an error otherwise).
    pub fn start(
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<SandboxServer> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let base_url = base_url_for(listener.local_addr()?)?;
        let app = router(Arc::new(Sandbox::new(&base_url)));
        // Small responses on keep-alive connections: without NODELAY, Nagle plus
        // delayed ACKs can add ~40 ms to a login under load.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::trace!(error = %e, "sandbox: could not set TCP_NODELAY");
            }
        });
        runtime.spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "sandbox provider server stopped");
            }
        });
        Ok(SandboxServer { base_url })
    }

    /// e.g. `http://127.0.0.1:PORT/`. `Url` always serializes an http URL with
    /// a `/` path; use `join("authorize")` or trim the slash before appending.
    pub fn base_url(&self) -> Url {
        self.base_url.clone()
    }
}

/// A wildcard bind address is not something a browser can open, so such
/// listeners are advertised on loopback.
fn base_url_for(mut addr: SocketAddr) -> io::Result<Url> {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Url::parse(&format!("http://{addr}")).map_err(io::Error::other)
}

fn router(sandbox: Arc<Sandbox>) -> Router {
    bounded(
        Router::new()
            .route("/authorize", get(authorize::authorize))
            .route("/token", post(token::token))
            .route("/userinfo", get(profile::userinfo).post(profile::userinfo))
            .route("/avatar/{file}", get(profile::avatar))
            .with_state(sandbox),
        MAX_CONCURRENT_REQUESTS,
    )
}

/// `routes` with at most `slots` requests at once and `REQUEST_TIMEOUT`
/// each (axum's default body limit, 2 MB, already bounds what is read).
fn bounded(routes: Router, slots: usize) -> Router {
    let slots = Arc::new(tokio::sync::Semaphore::new(slots));
    routes.layer(middleware::from_fn_with_state(slots, limit))
}

async fn limit(
    State(slots): State<Arc<tokio::sync::Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_slot) = slots.try_acquire() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "sandbox: too many requests at once; try again",
        )
            .into_response();
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "sandbox: the request took too long",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request past the listener's bound is answered 503 at once, and
    /// the slot comes back when the request holding it finishes.
    #[tokio::test]
    async fn a_full_listener_answers_503_at_once() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let held = gate.clone();
        let routes = Router::new()
            .route(
                "/slow",
                get(move || {
                    let held = held.clone();
                    async move {
                        held.notified().await;
                        "done"
                    }
                }),
            )
            .route("/fast", get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, bounded(routes, 1)).await });
        let client = reqwest::Client::new();
        let slow = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .get(format!("http://{addr}/slow"))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        });
        let fast = format!("http://{addr}/fast");
        let mut refused = false;
        for _ in 0..100 {
            if client.get(&fast).send().await.unwrap().status() == StatusCode::SERVICE_UNAVAILABLE {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            refused,
            "the second request was not refused while the slot was held"
        );
        gate.notify_one();
        assert_eq!(slow.await.unwrap(), StatusCode::OK);
        assert_eq!(
            client.get(&fast).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
}
