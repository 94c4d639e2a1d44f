//! The one mapping from domain errors to `tonic::Status`. Every error has a
//! stable [`Reason`]; [`code`] gives each its gRPC code. The status carries
//! a `google.rpc.ErrorInfo` (domain `authbroker`, the reason, and for
//! provider failures the provider and its own short error code) and, for
//! bad input, a `BadRequest` field violation. This is also where failures
//! are logged, with their full cause chain.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    admin::AdminError, login::LoginError, provider::ProviderError, reason::Reason,
    tokens::TokenError,
};

pub const DOMAIN: &str = "authbroker";

/// The gRPC code each reason is sent with. The README's error table must
/// give each the same code; a test checks. No wildcard arm: a new reason
/// does not compile until it has a code here.
pub const fn code(reason: Reason) -> Code {
    match reason {
        Reason::MissingField
        | Reason::FieldTooLong
        | Reason::InvalidField
        | Reason::InvalidPageToken
        | Reason::MalformedRequest
        | Reason::UnknownProvider
        | Reason::RedirectUriNotAllowed
        | Reason::ScopeNotAllowed
        | Reason::ReturnToNotAllowed => Code::InvalidArgument,
        Reason::ProviderDisabled
        | Reason::StateExpired
        | Reason::StateAlreadyUsed
        | Reason::AccessDenied
        | Reason::ProviderAuthorizeError
        | Reason::ProviderRejected
        | Reason::ProviderTlsError
        | Reason::IdTokenInvalid
        | Reason::CallbackIssuerMismatch
        | Reason::LinkTicketExpired
        | Reason::LinkTicketAlreadyUsed
        | Reason::IdentityLinkedElsewhere
        | Reason::ProviderAlreadyLinked
        | Reason::LastIdentity
        | Reason::TokenExpired
        | Reason::TokenUnusable
        | Reason::RefreshTokenRejected
        | Reason::RevocationRefused => Code::FailedPrecondition,
        Reason::StateUnknown
        | Reason::LinkTicketUnknown
        | Reason::UserNotFound
        | Reason::IdentityNotFound
        | Reason::TokenNotStored => Code::NotFound,
        Reason::MessageTooLarge | Reason::TooManyPendingLogins | Reason::RateLimited => {
            Code::ResourceExhausted
        }
        Reason::LoginInProgress | Reason::ConcurrentUpdate => Code::Aborted,
        Reason::ProviderUnavailable
        | Reason::StateStoreUnavailable
        | Reason::StoreUnavailable
        | Reason::ServerOverloaded => Code::Unavailable,
        Reason::ProviderBadResponse | Reason::VaultKeyMissing | Reason::Internal => Code::Internal,
        Reason::ApiKeyMissing | Reason::ApiKeyInvalid => Code::Unauthenticated,
        Reason::RoleNotAllowed => Code::PermissionDenied,
        Reason::RequestTimeout => Code::DeadlineExceeded,
    }
}

/// A refusal made at the edge, before any domain error exists (caller
/// authentication, limits, undecodable requests): the reason's code and an
/// `ErrorInfo`.
pub fn error_status(reason: Reason, message: impl Into<String>) -> Status {
    Status::with_error_details(code(reason), message, error_details(reason, HashMap::new()))
}

/// The `ErrorInfo` for a reason, to which a caller may add further details
/// (such as `RetryInfo`).
pub fn error_details(reason: Reason, metadata: HashMap<String, String>) -> ErrorDetails {
    ErrorDetails::with_error_info(reason.as_str(), DOMAIN, metadata)
}

/// `ErrorInfo.metadata` for a provider failure: which provider, and its own
/// short error code when it gave one.
fn provider_metadata(p: &ProviderError) -> HashMap<String, String> {
    let name = match p {
        ProviderError::Rejected { provider, .. }
        | ProviderError::Unavailable { provider, .. }
        | ProviderError::BadResponse { provider, .. }
        | ProviderError::Tls { provider, .. }
        | ProviderError::InvalidIdToken { provider, .. }
        | ProviderError::IssuerMismatch { provider, .. } => provider,
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
    reason: Reason,
    error: &dyn std::error::Error,
    field: Option<&'static str>,
    metadata: HashMap<String, String>,
) -> Status {
    let code = code(reason);
    let chain = crate::telemetry::cause_chain(error);
    match code {
        Code::Internal | Code::Unavailable | Code::Aborted => {
            tracing::warn!(reason = reason.as_str(), error = %chain, "call failed")
        }
        _ => tracing::info!(reason = reason.as_str(), error = %chain, "call refused"),
    }
    // Details of our own failures stay in the log.
    let message = if reason == Reason::Internal {
        "internal error; see the service log".to_string()
    } else {
        error.to_string()
    };
    let mut details = error_details(reason, metadata);
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
        AdminError::Token(
            TokenError::Provider(p)
            | TokenError::RefreshRejected(p)
            | TokenError::RevocationRefused(p),
        )
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
    fn every_reason_is_carried_with_its_code() {
        let check = |reason: Reason, status: Status| {
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.reason, reason.as_str());
            assert_eq!(info.domain, DOMAIN);
            assert_eq!(status.code(), code(reason));
        };
        for e in every_login_error() {
            check(e.reason(), login_error(e));
        }
        for e in every_admin_error() {
            check(e.reason(), admin_error(e));
        }
        for &reason in Reason::ALL {
            check(reason, error_status(reason, "m"));
        }
    }

    /// `Code::FailedPrecondition` as the README writes it: FAILED_PRECONDITION.
    fn upper_snake(code: Code) -> String {
        format!("{code:?}").chars().fold(String::new(), |mut s, c| {
            if c.is_ascii_uppercase() && !s.is_empty() {
                s.push('_');
            }
            s.push(c.to_ascii_uppercase());
            s
        })
    }

    #[test]
    fn readme_error_table_matches_the_code() {
        let readme = include_str!("../../README.md");
        // | `REASON` | CODE | when | retry? |
        let rows: Vec<(&str, &str, &str)> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| {
                let mut cells = l.split('|');
                let reason = cells.next()?.trim().trim_end_matches('`');
                let code = cells.next()?.trim();
                let retry = cells.nth(1)?.trim();
                reason
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_')
                    .then_some((reason, code, retry))
            })
            .collect();
        for &reason in Reason::ALL {
            let row = rows.iter().find(|(r, ..)| *r == reason.as_str());
            let Some((_, listed, retry)) = row else {
                panic!("README error table lacks {reason}");
            };
            assert_eq!(
                *listed,
                upper_snake(code(reason)),
                "README gives {reason} the wrong code"
            );
            assert_eq!(
                retry.starts_with("yes"),
                reason.retryable(),
                "README's retry column for {reason} says {retry:?}"
            );
        }
        for (reason, ..) in &rows {
            assert!(
                Reason::from_wire(reason).is_some(),
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
