//! The one mapping from domain errors to `tonic::Status`: a gRPC code, a
//! `google.rpc.ErrorInfo` with a stable reason (domain `authbroker`), and a
//! `BadRequest` field violation for bad input. This is also where failures
//! are logged, with their full cause chain.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{login::LoginError, provider::ProviderError, store::StoreError};

pub const DOMAIN: &str = "authbroker";

pub fn error_status(code: Code, reason: &str, message: impl Into<String>) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, HashMap::<String, String>::new()),
    )
}

pub fn login_error(e: LoginError) -> Status {
    let reason = e.reason();
    let code = match &e {
        LoginError::InvalidField { .. }
        | LoginError::MissingField { .. }
        | LoginError::FieldTooLong { .. }
        | LoginError::UnknownProvider { .. }
        | LoginError::RedirectUriNotAllowed
        | LoginError::ScopeNotAllowed { .. }
        | LoginError::ReturnToNotAllowed(_) => Code::InvalidArgument,
        LoginError::StateUnknown => Code::NotFound,
        LoginError::ProviderDisabled
        | LoginError::StateExpired
        | LoginError::StateAlreadyUsed
        | LoginError::AccessDenied
        | LoginError::ProviderAuthorizeError { .. }
        | LoginError::Provider(ProviderError::Rejected { .. })
        | LoginError::Provider(ProviderError::InvalidIdToken { .. }) => Code::FailedPrecondition,
        LoginError::TooManyPendingLogins => Code::ResourceExhausted,
        LoginError::Provider(ProviderError::Unavailable { .. })
        | LoginError::StateUnavailable(_)
        | LoginError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
        LoginError::Provider(ProviderError::BadResponse { .. }) => Code::Internal,
        LoginError::Store(_) => Code::Internal,
    };

    // Expected outcomes are routine; only failures on our side or the
    // provider's deserve a warning. `{:#}` prints the whole cause chain.
    let chain = crate::telemetry::cause_chain(&e);
    match code {
        Code::Internal | Code::Unavailable => {
            tracing::warn!(reason, error = %chain, "login failed")
        }
        _ => tracing::info!(reason, error = %chain, "login refused"),
    }

    let mut metadata = HashMap::new();
    if let LoginError::Provider(p) = &e {
        let provider = match p {
            ProviderError::Rejected { provider, .. }
            | ProviderError::Unavailable { provider, .. }
            | ProviderError::BadResponse { provider, .. }
            | ProviderError::InvalidIdToken { provider, .. } => provider,
        };
        metadata.insert("provider".to_string(), provider.clone());
        if let Some(code) = p.provider_code() {
            metadata.insert("provider_error".to_string(), code.to_string());
        }
    }
    if let LoginError::ProviderAuthorizeError { error } = &e {
        metadata.insert("provider_error".to_string(), error.clone());
    }
    let message = match &e {
        // Internal details stay in the log.
        LoginError::Store(StoreError::Internal(_)) => "internal error; see the service log".into(),
        other => other.to_string(),
    };
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    if let Some(field) = e.field() {
        details.add_bad_request_violation(field, message.clone());
    }
    Status::with_error_details(code, message, details)
}

/// Every `ErrorInfo.reason` this service sends. The README's error table must
/// list each one; a test checks both directions.
pub const REASONS: &[&str] = &[
    "MISSING_FIELD",
    "FIELD_TOO_LONG",
    "INVALID_FIELD",
    "UNKNOWN_PROVIDER",
    "REDIRECT_URI_NOT_ALLOWED",
    "SCOPE_NOT_ALLOWED",
    "RETURN_TO_NOT_ALLOWED",
    "PROVIDER_DISABLED",
    "STATE_UNKNOWN",
    "STATE_EXPIRED",
    "STATE_ALREADY_USED",
    "TOO_MANY_PENDING_LOGINS",
    "ACCESS_DENIED",
    "PROVIDER_AUTHORIZE_ERROR",
    "PROVIDER_REJECTED",
    "PROVIDER_UNAVAILABLE",
    "PROVIDER_BAD_RESPONSE",
    "ID_TOKEN_INVALID",
    "STATE_STORE_UNAVAILABLE",
    "STORE_UNAVAILABLE",
    "INTERNAL",
    "API_KEY_MISSING",
    "API_KEY_INVALID",
    "ROLE_NOT_ALLOWED",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Unavailable;

    fn every_login_error() -> Vec<LoginError> {
        let provider = || "p".to_string();
        let step = || "token".to_string();
        vec![
            LoginError::InvalidField {
                field: "state",
                problem: "x".into(),
            },
            LoginError::MissingField { field: "code" },
            LoginError::FieldTooLong {
                field: "code",
                limit: 1,
            },
            LoginError::UnknownProvider { known: "a".into() },
            LoginError::ProviderDisabled,
            LoginError::RedirectUriNotAllowed,
            LoginError::ScopeNotAllowed { scope: "s".into() },
            LoginError::ReturnToNotAllowed("x"),
            LoginError::StateUnknown,
            LoginError::StateExpired,
            LoginError::StateAlreadyUsed,
            LoginError::TooManyPendingLogins,
            LoginError::AccessDenied,
            LoginError::ProviderAuthorizeError { error: "e".into() },
            LoginError::Provider(ProviderError::Rejected {
                provider: provider(),
                step: step(),
                code: "c".into(),
            }),
            LoginError::Provider(ProviderError::Unavailable {
                provider: provider(),
                step: step(),
                cause: Unavailable::Timeout,
            }),
            LoginError::Provider(ProviderError::BadResponse {
                provider: provider(),
                step: step(),
                what: "w".into(),
            }),
            LoginError::Provider(ProviderError::InvalidIdToken {
                provider: provider(),
                why: "w".into(),
            }),
            LoginError::StateUnavailable(anyhow::anyhow!("rng")),
            LoginError::Store(StoreError::Unavailable(anyhow::anyhow!("down"))),
            LoginError::Store(StoreError::Internal(anyhow::anyhow!("bug"))),
        ]
    }

    #[test]
    fn every_reason_is_declared_and_carried() {
        use tonic_types::StatusExt;
        for e in every_login_error() {
            let reason = e.reason();
            assert!(REASONS.contains(&reason), "{reason} missing from REASONS");
            let status = login_error(e);
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, DOMAIN);
        }
    }

    #[test]
    fn readme_error_table_matches_the_code() {
        let readme = include_str!("../../README.md");
        let table: Vec<&str> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|r| r.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect();
        for r in REASONS {
            assert!(table.contains(r), "README error table lacks {r}");
        }
        for r in &table {
            assert!(
                REASONS.contains(r),
                "README lists {r}, which the code never sends"
            );
        }
    }

    #[test]
    fn internal_details_stay_out_of_messages() {
        let status = login_error(LoginError::Store(StoreError::Internal(anyhow::anyhow!(
            "relation users does not exist"
        ))));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("relation"));
    }
}
