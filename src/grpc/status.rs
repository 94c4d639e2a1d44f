//! The one mapping from domain errors to `tonic::Status`. Every error has a
//! stable reason; `REASONS` gives each its gRPC code. The status carries a
//! `google.rpc.ErrorInfo` (domain `authbroker`, the reason, and for provider
//! failures the provider and its own short error code) and, for bad input, a
//! `BadRequest` field violation. This is also where failures are logged,
//! with their full cause chain.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{admin::AdminError, login::LoginError, provider::ProviderError, tokens::TokenError};

pub const DOMAIN: &str = "authbroker";

/// Every `ErrorInfo.reason` this service sends, with its gRPC code. The
/// README's error table must list each with the same code; a test checks.
pub const REASONS: &[(&str, Code)] = &[
    ("MISSING_FIELD", Code::InvalidArgument),
    ("FIELD_TOO_LONG", Code::InvalidArgument),
    ("INVALID_FIELD", Code::InvalidArgument),
    ("INVALID_PAGE_TOKEN", Code::InvalidArgument),
    ("MALFORMED_REQUEST", Code::InvalidArgument),
    ("MESSAGE_TOO_LARGE", Code::ResourceExhausted),
    ("UNKNOWN_PROVIDER", Code::InvalidArgument),
    ("REDIRECT_URI_NOT_ALLOWED", Code::InvalidArgument),
    ("SCOPE_NOT_ALLOWED", Code::InvalidArgument),
    ("RETURN_TO_NOT_ALLOWED", Code::InvalidArgument),
    ("PROVIDER_DISABLED", Code::FailedPrecondition),
    ("STATE_UNKNOWN", Code::NotFound),
    ("STATE_EXPIRED", Code::FailedPrecondition),
    ("STATE_ALREADY_USED", Code::FailedPrecondition),
    ("TOO_MANY_PENDING_LOGINS", Code::ResourceExhausted),
    ("LOGIN_IN_PROGRESS", Code::Aborted),
    ("ACCESS_DENIED", Code::FailedPrecondition),
    ("PROVIDER_AUTHORIZE_ERROR", Code::FailedPrecondition),
    ("PROVIDER_REJECTED", Code::FailedPrecondition),
    ("PROVIDER_UNAVAILABLE", Code::Unavailable),
    ("PROVIDER_BAD_RESPONSE", Code::Internal),
    ("PROVIDER_TLS_ERROR", Code::FailedPrecondition),
    ("ID_TOKEN_INVALID", Code::FailedPrecondition),
    ("LINK_TICKET_UNKNOWN", Code::NotFound),
    ("LINK_TICKET_EXPIRED", Code::FailedPrecondition),
    ("LINK_TICKET_ALREADY_USED", Code::FailedPrecondition),
    ("IDENTITY_LINKED_ELSEWHERE", Code::FailedPrecondition),
    ("PROVIDER_ALREADY_LINKED", Code::FailedPrecondition),
    ("USER_NOT_FOUND", Code::NotFound),
    ("IDENTITY_NOT_FOUND", Code::NotFound),
    ("LAST_IDENTITY", Code::FailedPrecondition),
    ("TOKEN_NOT_STORED", Code::NotFound),
    ("TOKEN_EXPIRED", Code::FailedPrecondition),
    ("TOKEN_UNUSABLE", Code::FailedPrecondition),
    ("REFRESH_TOKEN_REJECTED", Code::FailedPrecondition),
    ("VAULT_KEY_MISSING", Code::Internal),
    ("CONCURRENT_UPDATE", Code::Aborted),
    ("STATE_STORE_UNAVAILABLE", Code::Unavailable),
    ("STORE_UNAVAILABLE", Code::Unavailable),
    ("INTERNAL", Code::Internal),
    ("API_KEY_MISSING", Code::Unauthenticated),
    ("API_KEY_INVALID", Code::Unauthenticated),
    ("ROLE_NOT_ALLOWED", Code::PermissionDenied),
    ("RATE_LIMITED", Code::ResourceExhausted),
    ("SERVER_OVERLOADED", Code::Unavailable),
    ("REQUEST_TIMEOUT", Code::DeadlineExceeded),
];

/// The code for a reason; an unlisted reason is a bug, reported as INTERNAL.
pub fn code_of(reason: &str) -> Code {
    REASONS
        .iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, c)| *c)
        .unwrap_or(Code::Internal)
}

pub fn error_status(code: Code, reason: &str, message: impl Into<String>) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, HashMap::<String, String>::new()),
    )
}

/// `ErrorInfo.metadata` for a provider failure: which provider, and its own
/// short error code when it gave one.
fn provider_metadata(p: &ProviderError) -> HashMap<String, String> {
    let name = match p {
        ProviderError::Rejected { provider, .. }
        | ProviderError::Unavailable { provider, .. }
        | ProviderError::BadResponse { provider, .. }
        | ProviderError::Tls { provider, .. }
        | ProviderError::InvalidIdToken { provider, .. } => provider,
    };
    let mut metadata = HashMap::from([("provider".to_string(), name.clone())]);
    if let Some(code) = p.provider_code() {
        metadata.insert("provider_error".to_string(), code.to_string());
    }
    metadata
}

/// Builds the status; logs routine refusals at info and our own or the
/// provider's failures at warn, with the cause chain.
fn status(
    reason: &'static str,
    error: &dyn std::error::Error,
    field: Option<&'static str>,
    metadata: HashMap<String, String>,
) -> Status {
    let code = code_of(reason);
    let chain = crate::telemetry::cause_chain(error);
    match code {
        Code::Internal | Code::Unavailable | Code::Aborted => {
            tracing::warn!(reason, error = %chain, "call failed")
        }
        _ => tracing::info!(reason, error = %chain, "call refused"),
    }
    // Details of our own failures stay in the log.
    let message = if reason == "INTERNAL" {
        "internal error; see the service log".to_string()
    } else {
        error.to_string()
    };
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    if let Some(field) = field {
        details.add_bad_request_violation(field, message.clone());
    }
    Status::with_error_details(code, message, details)
}

pub fn login_error(e: LoginError) -> Status {
    let metadata = match &e {
        LoginError::Provider(p) => provider_metadata(p),
        LoginError::ProviderAuthorizeError { error } => {
            HashMap::from([("provider_error".to_string(), error.clone())])
        }
        _ => HashMap::new(),
    };
    status(e.reason(), &e, e.field(), metadata)
}

pub fn admin_error(e: AdminError) -> Status {
    let metadata = match &e {
        AdminError::Token(TokenError::Provider(p) | TokenError::RefreshRejected(p))
        | AdminError::Input(LoginError::Provider(p)) => provider_metadata(p),
        _ => HashMap::new(),
    };
    status(e.reason(), &e, e.field(), metadata)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{provider::Unavailable, store::StoreError};

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
            LoginError::LoginInProgress,
            LoginError::LinkTicketUnknown,
            LoginError::LinkTicketExpired,
            LoginError::LinkTicketUsed,
            LoginError::IdentityLinkedElsewhere,
            LoginError::ProviderAlreadyLinked,
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
            LoginError::Provider(ProviderError::Tls {
                provider: provider(),
                step: step(),
                failure: crate::http::TlsFailure::Untrusted,
            }),
            LoginError::StateUnavailable(anyhow::anyhow!("rng")),
            LoginError::Store(StoreError::Unavailable(anyhow::anyhow!("down"))),
            LoginError::Store(StoreError::Internal(anyhow::anyhow!("bug"))),
        ]
    }

    fn every_admin_error() -> Vec<AdminError> {
        vec![
            AdminError::InvalidPageToken,
            AdminError::InvalidPageSize,
            AdminError::UserNotFound,
            AdminError::IdentityNotFound,
            AdminError::NotLinked,
            AdminError::LastIdentity,
            AdminError::Token(TokenError::UnknownProvider),
            AdminError::Token(TokenError::NotStored),
            AdminError::Token(TokenError::Unusable),
            AdminError::Token(TokenError::Expired),
            AdminError::Token(TokenError::Vault(crate::vault::VaultError::Corrupt)),
            AdminError::Store(StoreError::Conflict(crate::store::Conflict::StaleToken)),
        ]
    }

    #[test]
    fn every_reason_is_declared_and_carried() {
        let check = |reason: &str, status: Status| {
            assert!(
                REASONS.iter().any(|(r, _)| *r == reason),
                "{reason} missing from REASONS"
            );
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, DOMAIN);
            assert_eq!(status.code(), code_of(reason));
        };
        for e in every_login_error() {
            check(e.reason(), login_error(e));
        }
        for e in every_admin_error() {
            check(e.reason(), admin_error(e));
        }
    }

    #[test]
    fn readme_error_table_matches_the_code() {
        let readme = include_str!("../../README.md");
        let rows: Vec<(&str, &str)> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| {
                let mut cells = l.split('|');
                let reason = cells.next()?.trim().trim_end_matches('`');
                let code = cells.next()?.trim();
                reason
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_')
                    .then_some((reason, code))
            })
            .collect();
        for (reason, code) in REASONS {
            let row = rows.iter().find(|(r, _)| r == reason);
            let Some((_, listed)) = row else {
                panic!("README error table lacks {reason}");
            };
            let expected = format!("{code:?}").chars().fold(String::new(), |mut s, c| {
                if c.is_ascii_uppercase() && !s.is_empty() {
                    s.push('_');
                }
                s.push(c.to_ascii_uppercase());
                s
            });
            assert_eq!(*listed, expected, "README gives {reason} the wrong code");
        }
        for (reason, _) in &rows {
            assert!(
                REASONS.iter().any(|(r, _)| r == reason),
                "README lists {reason}, which the code never sends"
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
