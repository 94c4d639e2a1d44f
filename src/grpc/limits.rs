//! How many LoginService and AdminService calls may be in progress at once,
//! over every connection, and for how long each may run.
//!
//! A call past `server.max_concurrent_calls` is refused at once with
//! UNAVAILABLE and `SERVER_OVERLOADED` rather than queued: a queue without
//! end only turns overload into timeouts and memory, while a quick refusal
//! lets the client back off or try another replica. Health and reflection
//! are left out, so a busy replica still answers its health checks; they
//! are cheap, and HTTP/2's `max_concurrent_streams` bounds them per
//! connection.
//!
//! A call still running after `server.request_timeout` is dropped and
//! answered DEADLINE_EXCEEDED with `REQUEST_TIMEOUT`. Every step of a login
//! tolerates being dropped (a claimed state is released by its lease), as it
//! must anyway when a client gives up.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::{
    Status,
    body::Body,
    codegen::{Service, http},
    server::NamedService,
};

use super::status::error_status;
use crate::reason::Reason;

/// The bound shared by every service and connection it is given to.
#[derive(Clone)]
pub struct CallLimits {
    permits: Arc<Semaphore>,
    max_calls: usize,
    timeout: Duration,
}

impl CallLimits {
    pub fn new(max_calls: usize, timeout: Duration) -> CallLimits {
        CallLimits {
            permits: Arc::new(Semaphore::new(max_calls)),
            max_calls,
            timeout,
        }
    }
}

/// A gRPC service whose calls count against [`CallLimits`].
#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    limits: CallLimits,
}

impl<S> Limited<S> {
    pub fn new(inner: S, limits: CallLimits) -> Self {
        Limited { inner, limits }
    }
}

impl<S, B> Service<http::Request<B>> for Limited<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = LimitedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.limits.permits.clone().try_acquire_owned() {
            Ok(permit) => LimitedCall::Running {
                inner: self.inner.call(request),
                deadline: Instant::now() + self.limits.timeout,
                timer: None,
                timeout: self.limits.timeout,
                _permit: permit,
            },
            Err(_) => {
                tracing::debug!(
                    max = self.limits.max_calls,
                    "call refused: server.max_concurrent_calls are in progress"
                );
                LimitedCall::Refused {
                    max_calls: self.limits.max_calls,
                }
            }
        }
    }
}

impl<S: NamedService> NamedService for Limited<S> {
    const NAME: &'static str = S::NAME;
}

pin_project! {
    /// A call within the limits, or the refusal of one past them.
    #[project = CallProj]
    pub enum LimitedCall<F> {
        Running {
            #[pin]
            inner: F,
            deadline: Instant,
            // Made only when the call does not finish in its first poll
            // (most BeginLogins do), which saves a timer registration.
            timer: Option<Pin<Box<Sleep>>>,
            timeout: Duration,
            // Held until the answer is ready.
            _permit: OwnedSemaphorePermit,
        },
        Refused { max_calls: usize },
    }
}

impl<F, E> Future for LimitedCall<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CallProj::Running {
                inner,
                deadline,
                timer,
                timeout,
                ..
            } => {
                if let Poll::Ready(answer) = inner.poll(cx) {
                    return Poll::Ready(answer);
                }
                let timer =
                    timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*deadline)));
                ready!(timer.as_mut().poll(cx));
                tracing::warn!(
                    ?timeout,
                    "call abandoned: it ran longer than server.request_timeout"
                );
                Poll::Ready(Ok(error_status(
                    Reason::RequestTimeout,
                    format!(
                        "the call took longer than the server's limit of {} s",
                        timeout.as_secs_f64()
                    ),
                )
                .into_http()))
            }
            CallProj::Refused { max_calls } => Poll::Ready(Ok(overloaded(*max_calls).into_http())),
        }
    }
}

fn overloaded(max_calls: usize) -> Status {
    error_status(
        Reason::ServerOverloaded,
        format!("the server is at its limit of {max_calls} calls in progress; retry with backoff"),
    )
}
