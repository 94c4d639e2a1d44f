//! The outermost layer of LoginService and AdminService: each call runs in
//! an `rpc` span that joins the caller's trace (`telemetry::trace`), and is
//! counted and timed by method and gRPC status when it ends. It sits
//! outside authentication, so refused callers are counted too.
//!
//! The status of a call is in the response headers when it failed before
//! its answer (a trailers-only response) and in the trailers otherwise, so
//! the response body is wrapped to read them. A call dropped before its
//! status is known (the client went away) counts as `CANCELLED`.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll, ready},
    time::Instant,
};

use http_body::Frame;
use pin_project_lite::pin_project;
use prost::Message;
use tonic::{
    Code, Status,
    body::Body,
    codegen::{Bytes, Service, http},
    server::NamedService,
};
use tonic_types::StatusExt;
use tracing::Span;

use crate::{reason::Reason, telemetry::trace};

/// The label of a call to a path that names no RPC of ours.
const UNKNOWN_METHOD: &str = "unknown";

/// An RPC of ours, as spans and metrics name it.
struct Rpc {
    /// `package.Service/Method`, OpenTelemetry's span name for it.
    full_name: String,
    /// `Method`, the metrics label (unique across our services; a test
    /// checks).
    method: String,
}

/// Every RPC in our descriptors by request path (`/package.Service/Method`):
/// the only method names that become label values.
fn rpcs() -> &'static HashMap<String, Rpc> {
    static RPCS: OnceLock<HashMap<String, Rpc>> = OnceLock::new();
    RPCS.get_or_init(|| {
        let Ok(set) = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET) else {
            // Built into the binary by build.rs; cannot fail to decode.
            tracing::error!("the service descriptors cannot be read; methods are not labelled");
            return HashMap::new();
        };
        let mut rpcs = HashMap::new();
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let full_name = format!("{package}.{}/{}", service.name(), method.name());
                    rpcs.insert(
                        format!("/{full_name}"),
                        Rpc {
                            full_name,
                            method: method.name().to_string(),
                        },
                    );
                }
            }
        }
        rpcs
    })
}

/// The canonical name of a gRPC status code, as a label.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The `grpc-status` in `headers`, if there is one.
fn status_in(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(code_name(Code::from_i32(value.parse().ok()?)))
}

/// Counts a call that authentication refused, by its reason.
pub(crate) fn auth_refused(status: &Status) {
    let reason = status
        .get_details_error_info()
        .and_then(|info| Reason::from_wire(&info.reason))
        .map_or("OTHER", Reason::as_str);
    crate::metrics::auth_failed(reason);
}

/// A service whose calls are traced, counted and timed.
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
}

impl<S> Observed<S> {
    pub fn new(inner: S) -> Self {
        Observed { inner }
    }
}

impl<S, B> Service<http::Request<B>> for Observed<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = ObservedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = rpcs().get(request.uri().path());
        let (full_name, method) = rpc.map_or((UNKNOWN_METHOD, UNKNOWN_METHOD), |r| {
            (r.full_name.as_str(), r.method.as_str())
        });
        let span = tracing::info_span!(
            "rpc",
            otel.name = full_name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            request_id = tracing::field::Empty,
        );
        trace::join_caller(&span, request.headers());
        let inner = span.in_scope(|| self.inner.call(request));
        ObservedCall {
            inner,
            recording: Some(Recording {
                method,
                started: Instant::now(),
                code: code_name(Code::Cancelled),
                span: span.clone(),
            }),
            span,
        }
    }
}

impl<S: NamedService> NamedService for Observed<S> {
    const NAME: &'static str = S::NAME;
}

/// Records the call when dropped, with the last status it saw.
struct Recording {
    method: &'static str,
    started: Instant,
    code: &'static str,
    span: Span,
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.span.record("rpc.grpc.status_code", self.code);
        crate::metrics::grpc_call(self.method, self.code, self.started.elapsed());
    }
}

pin_project! {
    pub struct ObservedCall<F> {
        #[pin]
        inner: F,
        span: Span,
        recording: Option<Recording>,
    }
}

impl<F, E> Future for ObservedCall<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let answer = ready!(this.inner.poll(cx));
        let Some(mut recording) = this.recording.take() else {
            return Poll::Ready(answer);
        };
        Poll::Ready(match answer {
            Ok(response) => match status_in(response.headers()) {
                Some(code) => {
                    recording.code = code;
                    Ok(response)
                }
                None => Ok(response.map(|body| {
                    Body::new(ObservedBody {
                        inner: body,
                        recording,
                    })
                })),
            },
            Err(e) => {
                recording.code = code_name(Code::Unknown);
                Err(e)
            }
        })
    }
}

pin_project! {
    /// A response body that reads the status from its trailers.
    struct ObservedBody {
        #[pin]
        inner: Body,
        recording: Recording,
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(code) = frame.trailers_ref().and_then(status_in)
        {
            this.recording.code = code;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_ours_has_a_label_and_no_label_is_shared() {
        let rpcs = rpcs();
        for path in [
            "/authbroker.v1.LoginService/BeginLogin",
            "/authbroker.v1.LoginService/CompleteLogin",
            "/authbroker.v1.AdminService/ListProviders",
        ] {
            assert!(rpcs.contains_key(path), "{path}");
        }
        let mut labels: Vec<&str> = rpcs.values().map(|r| r.method.as_str()).collect();
        let all = labels.len();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), all, "two RPCs share a method name");
    }

    #[test]
    fn statuses_are_read_as_their_canonical_names() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_in(&headers), None);
        headers.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(status_in(&headers), Some("NOT_FOUND"));
        headers.insert("grpc-status", "999".parse().unwrap());
        assert_eq!(status_in(&headers), Some("UNKNOWN"));
    }
}
