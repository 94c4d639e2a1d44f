//! Fault injection shared by the provider emulators. A test arms a [`Fault`]
//! on one endpoint; the emulator's handler calls [`Faults::apply`] first and,
//! when it gets a response back, sends that instead of its normal answer.

use std::{collections::HashMap, convert::Infallible, hash::Hash, io, sync::Mutex, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

/// The body [`Fault::Garbage`] sends, labelled `application/json`.
pub const GARBAGE_BODY: &str = "<html>not json";
/// How [`Fault::Oversized`] bodies begin: valid-looking JSON that never ends.
pub const OVERSIZED_PREFIX: &str = "{\"access_token\":\"";
/// How long [`Fault::Hang`] waits: far beyond any client timeout in a test.
pub const HANG_FOR: Duration = Duration::from_secs(3600);

/// One way for an endpoint to misbehave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Waits, then answers normally.
    Slow(Duration),
    /// HTTP 500 with an HTML error page, as a load balancer or crashed app would send.
    Status500,
    /// HTTP 503 with an HTML error page.
    Status503,
    /// HTTP 200 labelled `application/json` whose body is [`GARBAGE_BODY`].
    Garbage,
    /// HTTP 200 `application/json` of exactly this many bytes (at least the
    /// prefix), streamed chunked with no `Content-Length`, so a client must
    /// count bytes to enforce its size cap.
    Oversized(usize),
    /// Never answers (sleeps for [`HANG_FOR`]); the client's timeout must fire.
    Hang,
    /// Drops the connection without a complete answer (in practice before
    /// the status line): the client sees a transport error, not an HTTP status.
    CloseConnection,
    /// Answers exactly this (status, content type, body): the provider's own
    /// words for a refusal, e.g. a dead refresh token.
    Respond(u16, &'static str, String),
}

impl Fault {
    /// The response this fault produces, or `None` when the endpoint should
    /// then answer normally (`Slow`, or `Hang` after its hour).
    pub async fn respond(&self) -> Option<Response> {
        match self {
            Fault::Slow(delay) => {
                tokio::time::sleep(*delay).await;
                None
            }
            Fault::Status500 => Some(html_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error",
            )),
            Fault::Status503 => Some(html_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable",
            )),
            Fault::Garbage => {
                Some(([(header::CONTENT_TYPE, "application/json")], GARBAGE_BODY).into_response())
            }
            Fault::Oversized(total) => Some(oversized(*total)),
            Fault::Hang => {
                tokio::time::sleep(HANG_FOR).await;
                None
            }
            Fault::CloseConnection => {
                // hyper drops the connection when the body stream fails; the
                // head is still in its write buffer then, so nothing is sent.
                let failing = futures::stream::once(async {
                    Err::<Bytes, _>(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "fault injection: connection dropped",
                    ))
                });
                Some(
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        Body::from_stream(failing),
                    )
                        .into_response(),
                )
            }
            Fault::Respond(status, content_type, body) => Some(
                (
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                    [(header::CONTENT_TYPE, *content_type)],
                    body.clone(),
                )
                    .into_response(),
            ),
        }
    }
}

fn html_error(status: StatusCode, title: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!(
            "<!DOCTYPE html>\n<html><head><title>{title}</title></head>\
<body><h1>{title}</h1><p>fault injected by the test emulator</p></body></html>\n"
        ),
    )
        .into_response()
}

fn oversized(total: usize) -> Response {
    const CHUNK: usize = 64 * 1024;
    let filler = Bytes::from(vec![b'A'; CHUNK]);
    let mut left = total.saturating_sub(OVERSIZED_PREFIX.len());
    let mut chunks = vec![Bytes::from_static(OVERSIZED_PREFIX.as_bytes())];
    while left > 0 {
        let n = left.min(CHUNK);
        chunks.push(filler.slice(..n));
        left -= n;
    }
    let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, Infallible>));
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response()
}

#[derive(Debug)]
struct Armed {
    fault: Fault,
    /// `None`: until cleared. `Some(n)`: for the next `n` requests.
    remaining: Option<u32>,
}

/// The faults armed per endpoint, for any emulator's own endpoint enum.
///
/// A std `Mutex` is enough: it is held only to look up or count down an
/// entry, never across an `.await`.
#[derive(Debug)]
pub struct Faults<E> {
    armed: Mutex<HashMap<E, Armed>>,
}

impl<E> Default for Faults<E> {
    fn default() -> Self {
        Faults {
            armed: Mutex::new(HashMap::new()),
        }
    }
}

impl<E: Copy + Eq + Hash> Faults<E> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every request to `endpoint` gets `fault` until cleared.
    pub fn set(&self, endpoint: E, fault: Fault) {
        self.lock().insert(
            endpoint,
            Armed {
                fault,
                remaining: None,
            },
        );
    }

    /// Only the next `times` requests to `endpoint` get `fault` (retry tests).
    pub fn set_times(&self, endpoint: E, fault: Fault, times: u32) {
        let mut armed = self.lock();
        if times == 0 {
            armed.remove(&endpoint);
        } else {
            armed.insert(
                endpoint,
                Armed {
                    fault,
                    remaining: Some(times),
                },
            );
        }
    }

    pub fn clear(&self, endpoint: E) {
        self.lock().remove(&endpoint);
    }

    pub fn clear_all(&self) {
        self.lock().clear();
    }

    /// The fault armed on `endpoint`, without consuming it.
    pub fn get(&self, endpoint: E) -> Option<Fault> {
        self.lock().get(&endpoint).map(|a| a.fault.clone())
    }

    /// Call first in a handler: `Some(response)` means send it and stop.
    pub async fn apply(&self, endpoint: E) -> Option<Response> {
        let fault = self.take(endpoint)?;
        fault.respond().await
    }

    fn take(&self, endpoint: E) -> Option<Fault> {
        let mut armed = self.lock();
        let entry = armed.get_mut(&endpoint)?;
        let fault = entry.fault.clone();
        if let Some(n) = &mut entry.remaining {
            *n -= 1;
            if *n == 0 {
                armed.remove(&endpoint);
            }
        }
        Some(fault)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<E, Armed>> {
        // A panicking test thread must not take every later request down with it.
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }
}
