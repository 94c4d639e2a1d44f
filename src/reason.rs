//! The stable reasons a call can fail for: each is an `ErrorInfo.reason`
//! on the wire, the `reason` of a failed call's audit event, and a row of
//! the README's error table.
//!
//! The enum lives here, below every layer, because the domain layers
//! (`login`, `admin`, `tokens`) name their failures with it and must not
//! import `grpc`. For the same reason the gRPC code of each reason is not
//! here but in `grpc::status::code`: `tonic::Code` is the transport's
//! vocabulary, and that match is exhaustive too, so a new reason does not
//! compile until it has a code there, a wire string and a retry answer
//! here. `Reason::ALL` is generated from the same list as the variants, so
//! the README check that walks it cannot miss one.

use std::fmt;

/// Declares the enum, its wire strings and `ALL` from one list, so that no
/// variant can be left out of `ALL`.
macro_rules! reasons {
    ($($variant:ident => $wire:literal,)*) => {
        /// Why a call failed, as callers and operators see it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($variant,)*
        }

        impl Reason {
            /// Every reason, in the README's order.
            pub const ALL: &[Reason] = &[$(Reason::$variant,)*];

            /// The exact string sent in `ErrorInfo.reason` and recorded in
            /// audit events; stable, UPPER_SNAKE.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $wire,)*
                }
            }
        }
    };
}

reasons! {
    MissingField => "MISSING_FIELD",
    FieldTooLong => "FIELD_TOO_LONG",
    InvalidField => "INVALID_FIELD",
    InvalidPageToken => "INVALID_PAGE_TOKEN",
    MalformedRequest => "MALFORMED_REQUEST",
    MessageTooLarge => "MESSAGE_TOO_LARGE",
    UnknownProvider => "UNKNOWN_PROVIDER",
    RedirectUriNotAllowed => "REDIRECT_URI_NOT_ALLOWED",
    ScopeNotAllowed => "SCOPE_NOT_ALLOWED",
    ReturnToNotAllowed => "RETURN_TO_NOT_ALLOWED",
    ProviderDisabled => "PROVIDER_DISABLED",
    StateUnknown => "STATE_UNKNOWN",
    StateExpired => "STATE_EXPIRED",
    StateAlreadyUsed => "STATE_ALREADY_USED",
    TooManyPendingLogins => "TOO_MANY_PENDING_LOGINS",
    LoginInProgress => "LOGIN_IN_PROGRESS",
    AccessDenied => "ACCESS_DENIED",
    ProviderAuthorizeError => "PROVIDER_AUTHORIZE_ERROR",
    ProviderRejected => "PROVIDER_REJECTED",
    ProviderUnavailable => "PROVIDER_UNAVAILABLE",
    ProviderBadResponse => "PROVIDER_BAD_RESPONSE",
    ProviderTlsError => "PROVIDER_TLS_ERROR",
    IdTokenInvalid => "ID_TOKEN_INVALID",
    CallbackIssuerMismatch => "CALLBACK_ISSUER_MISMATCH",
    LinkTicketUnknown => "LINK_TICKET_UNKNOWN",
    LinkTicketExpired => "LINK_TICKET_EXPIRED",
    LinkTicketAlreadyUsed => "LINK_TICKET_ALREADY_USED",
    IdentityLinkedElsewhere => "IDENTITY_LINKED_ELSEWHERE",
    ProviderAlreadyLinked => "PROVIDER_ALREADY_LINKED",
    UserNotFound => "USER_NOT_FOUND",
    IdentityNotFound => "IDENTITY_NOT_FOUND",
    LastIdentity => "LAST_IDENTITY",
    TokenNotStored => "TOKEN_NOT_STORED",
    TokenExpired => "TOKEN_EXPIRED",
    TokenUnusable => "TOKEN_UNUSABLE",
    RefreshTokenRejected => "REFRESH_TOKEN_REJECTED",
    RevocationRefused => "REVOCATION_REFUSED",
    VaultKeyMissing => "VAULT_KEY_MISSING",
    ConcurrentUpdate => "CONCURRENT_UPDATE",
    StateStoreUnavailable => "STATE_STORE_UNAVAILABLE",
    StoreUnavailable => "STORE_UNAVAILABLE",
    Internal => "INTERNAL",
    ApiKeyMissing => "API_KEY_MISSING",
    ApiKeyInvalid => "API_KEY_INVALID",
    RoleNotAllowed => "ROLE_NOT_ALLOWED",
    RateLimited => "RATE_LIMITED",
    ServerOverloaded => "SERVER_OVERLOADED",
    RequestTimeout => "REQUEST_TIMEOUT",
}

impl Reason {
    /// Whether the same call may succeed later with nothing changed: the
    /// README's "retry?" column says yes. `Internal` is not: it may pass on
    /// a retry, but nothing says it will.
    pub const fn retryable(self) -> bool {
        match self {
            Reason::TooManyPendingLogins
            | Reason::LoginInProgress
            | Reason::ProviderUnavailable
            | Reason::ConcurrentUpdate
            | Reason::StateStoreUnavailable
            | Reason::StoreUnavailable
            | Reason::RateLimited
            | Reason::ServerOverloaded
            | Reason::RequestTimeout => true,
            Reason::MissingField
            | Reason::FieldTooLong
            | Reason::InvalidField
            | Reason::InvalidPageToken
            | Reason::MalformedRequest
            | Reason::MessageTooLarge
            | Reason::UnknownProvider
            | Reason::RedirectUriNotAllowed
            | Reason::ScopeNotAllowed
            | Reason::ReturnToNotAllowed
            | Reason::ProviderDisabled
            | Reason::StateUnknown
            | Reason::StateExpired
            | Reason::StateAlreadyUsed
            | Reason::AccessDenied
            | Reason::ProviderAuthorizeError
            | Reason::ProviderRejected
            | Reason::ProviderBadResponse
            | Reason::ProviderTlsError
            | Reason::IdTokenInvalid
            | Reason::CallbackIssuerMismatch
            | Reason::LinkTicketUnknown
            | Reason::LinkTicketExpired
            | Reason::LinkTicketAlreadyUsed
            | Reason::IdentityLinkedElsewhere
            | Reason::ProviderAlreadyLinked
            | Reason::UserNotFound
            | Reason::IdentityNotFound
            | Reason::LastIdentity
            | Reason::TokenNotStored
            | Reason::TokenExpired
            | Reason::TokenUnusable
            | Reason::RefreshTokenRejected
            | Reason::RevocationRefused
            | Reason::VaultKeyMissing
            | Reason::Internal
            | Reason::ApiKeyMissing
            | Reason::ApiKeyInvalid
            | Reason::RoleNotAllowed => false,
        }
    }

    /// The reason a wire string names, if this service sends it (for
    /// clients and tests that read `ErrorInfo.reason` back).
    pub fn from_wire(wire: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == wire)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_are_unique_upper_snake_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for &r in Reason::ALL {
            let wire = r.as_str();
            assert!(seen.insert(wire), "{wire} twice");
            assert!(
                wire.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{wire}"
            );
            assert_eq!(Reason::from_wire(wire), Some(r));
            assert_eq!(r.to_string(), wire);
        }
        assert_eq!(Reason::from_wire("USER_DENIED"), None);
    }
}
