//! Statuses that tonic's codec answers before any handler runs, given the
//! same shape as ours: a request over the size limit is RESOURCE_EXHAUSTED
//! (tonic says OUT_OF_RANGE) and one that is not a valid message of its RPC
//! (e.g. a string field that is not UTF-8) is INVALID_ARGUMENT (tonic says
//! INTERNAL), each with an `ErrorInfo` like every other error.

use std::task::{Context, Poll};

use futures::{TryFutureExt, future::MapOk};
use tonic::{
    Code, Status,
    body::Body,
    codegen::{Service, http},
    server::NamedService,
};

use super::status::error_status;
use crate::reason::Reason;

/// What tonic writes for a message longer than `max_decoding_message_size`.
const TOO_LARGE: &str = "Error, decoded message length too large: ";
/// What prost's `DecodeError` writes, through tonic-prost's INTERNAL.
const UNDECODABLE: &str = "failed to decode Protobuf message";

/// Wraps a generated service server (inside authentication and limits) and
/// rewrites tonic's own decoding failures; every other answer passes as is.
#[derive(Clone)]
pub struct DecodeErrors<S> {
    inner: S,
}

impl<S> DecodeErrors<S> {
    pub fn new(inner: S) -> Self {
        DecodeErrors { inner }
    }
}

type Rewrite = fn(http::Response<Body>) -> http::Response<Body>;

impl<S, B> Service<http::Request<B>> for DecodeErrors<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = MapOk<S::Future, Rewrite>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.inner.call(request).map_ok(rewrite as Rewrite)
    }
}

impl<S: NamedService> NamedService for DecodeErrors<S> {
    const NAME: &'static str = S::NAME;
}

/// A failed decode is answered trailers-only, its status in the headers;
/// so is a handler's error, which the message tells apart.
fn rewrite(response: http::Response<Body>) -> http::Response<Body> {
    let candidate = matches!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(b"11" | b"13")
    );
    if !candidate {
        return response;
    }
    match Status::from_header_map(response.headers()).and_then(|s| replacement(&s)) {
        Some(status) => status.into_http(),
        None => response,
    }
}

fn replacement(status: &Status) -> Option<Status> {
    let message = status.message();
    let (reason, text) = if status.code() == Code::OutOfRange
        && let Some(sizes) = message.strip_prefix(TOO_LARGE)
    {
        (
            Reason::MessageTooLarge,
            format!("the request is larger than this service accepts ({sizes})"),
        )
    } else if status.code() == Code::Internal && message.starts_with(UNDECODABLE) {
        (
            Reason::MalformedRequest,
            format!(
                "the request is not a valid message for this method \
                 (are its text fields UTF-8?): {message}"
            ),
        )
    } else {
        return None;
    };
    tracing::info!(
        reason = reason.as_str(),
        "call refused before it reached a handler"
    );
    Some(error_status(reason, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    fn through(status: Status) -> Status {
        let response = rewrite(status.into_http());
        Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn codec_failures_get_our_shape_and_others_pass() {
        let big = through(Status::out_of_range(
            "Error, decoded message length too large: found 70000 bytes, the limit is: 65536 bytes",
        ));
        assert_eq!(big.code(), Code::ResourceExhausted);
        assert_eq!(
            big.get_details_error_info().unwrap().reason,
            "MESSAGE_TOO_LARGE"
        );
        assert!(big.message().contains("65536"), "{}", big.message());

        let bad = through(Status::internal(
            "failed to decode Protobuf message: BeginLoginRequest.provider: invalid string value: data is not UTF-8 encoded",
        ));
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert_eq!(
            bad.get_details_error_info().unwrap().reason,
            "MALFORMED_REQUEST"
        );

        for other in [
            Status::internal("internal error; see the service log"),
            Status::out_of_range("something else"),
            Status::not_found("x"),
        ] {
            let (code, message) = (other.code(), other.message().to_string());
            let passed = through(other);
            assert_eq!((passed.code(), passed.message()), (code, message.as_str()));
        }
    }
}
