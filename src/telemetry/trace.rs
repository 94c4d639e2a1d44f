//! Traces. With `[tracing] otlp_endpoint`, spans go to an OpenTelemetry
//! collector over OTLP/HTTP (protobuf); without it they exist only to put
//! context on log lines.
//!
//! A call that carries a W3C `traceparent` joins the caller's trace, and
//! every log line of the call carries that trace id; a call without one
//! starts a trace of its own when spans are exported, and otherwise gets a
//! random request id, so that a call's lines can always be found together.
//! The caller's `tracestate` is kept but its baggage is not read.

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TraceId, TracerProvider as _},
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{SdkTracer, SdkTracerProvider},
};
use tonic::codegen::http::HeaderMap;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{config::TracingSettings, telemetry::cause_chain};

/// The instrumentation scope named on every exported span.
const SCOPE: &str = "authbroker";
/// The path of OTLP/HTTP's traces endpoint under a collector's base URL.
const TRACES_PATH: &str = "v1/traces";

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot build the OTLP exporter")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The OTLP exporter. Dropping it sends what is still buffered, so keep it
/// for as long as the process serves.
pub struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// `None` when no `otlp_endpoint` is configured.
    pub fn start(settings: &TracingSettings) -> Result<Option<TraceExport>, TraceError> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        let mut endpoint = endpoint.clone();
        // A collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT would be
        // given; a URL with a path of its own is the traces URL itself.
        if endpoint.path() == "/" {
            endpoint.set_path(TRACES_PATH);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.as_str())
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_resource(
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .with_batch_exporter(exporter)
            .build();
        Ok(Some(TraceExport { provider }))
    }

    pub(crate) fn tracer(&self) -> SdkTracer {
        self.provider.tracer(SCOPE)
    }

    /// Sends every finished span now. Blocks until the collector answers.
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %cause_chain(&e), "could not export spans");
        }
    }
}

impl Drop for TraceExport {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %cause_chain(&e), "could not export the last spans");
        }
    }
}

/// gRPC metadata as the W3C propagator reads it.
struct Metadata<'a>(&'a HeaderMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` (declared with empty `trace_id` and `request_id` fields)
/// part of the trace whose `traceparent` the call carries, if any, and
/// records on it the id its log lines are found by.
pub fn join_caller(span: &Span, headers: &HeaderMap) {
    let caller = TraceContextPropagator::new().extract(&Metadata(headers));
    let remote = caller.span().span_context().clone();
    if remote.is_valid() {
        // Fails only when no exporting layer is installed; the caller's
        // trace id is still recorded below.
        let _ = span.set_parent(caller);
    }
    // Valid only when spans are exported: this span's own (maybe new) trace.
    let own = span.context().span().span_context().trace_id();
    let trace_id = if own != TraceId::INVALID {
        own
    } else {
        remote.trace_id()
    };
    if trace_id != TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    } else {
        span.record(
            "request_id",
            tracing::field::display(uuid::Uuid::new_v4().simple()),
        );
    }
}

/// The span of one store transaction, `doing` what it says. Made only
/// inside another span (a call's): readiness pings and migrations would
/// otherwise each be a trace of their own.
pub fn store_span(doing: &'static str) -> Span {
    if Span::current().is_none() {
        return Span::none();
    }
    tracing::info_span!(
        "store",
        otel.name = format!("store {doing}"),
        otel.kind = "client"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span() -> Span {
        tracing::info_span!(
            "call",
            trace_id = tracing::field::Empty,
            request_id = tracing::field::Empty
        )
    }

    #[test]
    fn the_callers_trace_id_is_read_from_traceparent() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let caller = TraceContextPropagator::new().extract(&Metadata(&headers));
        assert_eq!(
            caller.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        // Without a subscriber the span is disabled; joining must not panic.
        join_caller(&span(), &headers);
    }

    #[test]
    fn a_malformed_traceparent_is_no_trace() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", "00-zz-yy-01".parse().unwrap());
        let caller = TraceContextPropagator::new().extract(&Metadata(&headers));
        assert!(!caller.span().span_context().is_valid());
    }
}
