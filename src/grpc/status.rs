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
        | LoginError::Provider(ProviderError::Rejected { .. }) => Code::FailedPrecondition,
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
        Code::Internal | Code::Unavailable => tracing::warn!(reason, error = %chain, "login failed"),
        _ => tracing::info!(reason, error = %chain, "login refused"),
    }

    let mut metadata = HashMap::new();
    if let LoginError::Provider(p) = &e {
        let provider = match p {
            ProviderError::Rejected { provider, .. }
            | ProviderError::Unavailable { provider, .. }
            | ProviderError::BadResponse { provider, .. } => provider,
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
