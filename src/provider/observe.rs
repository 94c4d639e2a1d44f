//! Every HTTP request to a provider, timed into
//! `authbroker_provider_request_seconds` and traced as a client span. The
//! step and result labels come from fixed sets: a spec's request names are
//! the operator's to choose, so any but `emails` counts as `userinfo`.

use std::{future::Future, time::Instant};

use tracing::Instrument;

use super::ProviderError;

/// `step` as a label: one of token, userinfo, emails, refresh, revoke,
/// discovery, jwks.
pub(crate) fn step_label(step: &str) -> &'static str {
    match step {
        "token" => "token",
        "emails" => "emails",
        "refresh" => "refresh",
        "revoke" => "revoke",
        "discovery" => "discovery",
        "jwks" => "jwks",
        _ => "userinfo",
    }
}

fn result_label<T>(result: &Result<T, ProviderError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(ProviderError::Rejected { .. }) => "rejected",
        Err(ProviderError::Unavailable { .. }) => "unavailable",
        Err(ProviderError::Tls { .. }) => "tls_error",
        Err(ProviderError::BadResponse { .. }) => "bad_response",
        Err(ProviderError::InvalidIdToken { .. }) => "invalid_id_token",
        // Checked on the callback before any request; listed for the match.
        Err(ProviderError::IssuerMismatch { .. }) => "issuer_mismatch",
    }
}

/// Runs one provider request (send and read the answer) in its span and
/// records how long it took and how it ended.
pub(crate) async fn request<T>(
    provider: &str,
    step: &str,
    call: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    let step = step_label(step);
    let span = tracing::info_span!(
        "provider request",
        otel.name = format!("{provider} {step}"),
        otel.kind = "client",
        provider,
        step,
        result = tracing::field::Empty,
    );
    let started = Instant::now();
    let result = call.instrument(span.clone()).await;
    let label = result_label(&result);
    span.record("result", label);
    crate::metrics::provider_request(provider, step, label, started.elapsed());
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_a_fixed_set() {
        for step in ["token", "emails", "refresh", "revoke", "discovery", "jwks"] {
            assert_eq!(step_label(step), step);
        }
        for named_by_a_spec in ["user", "me", "openid", "userinfo", "anything/else"] {
            assert_eq!(step_label(named_by_a_spec), "userinfo");
        }
    }
}
