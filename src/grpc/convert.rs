//! Domain <-> protobuf conversions. Nothing else in the crate sees `pb`.

use prost_types::Timestamp;
use time::OffsetDateTime;

use super::pb;
use crate::{
    admin::{Moment, ProviderSummary},
    domain::{AuditEvent, Binding, Identity, LinkedIdentity, Outcome, User},
    login::{self, BeginLogin, BegunLogin, CompleteLogin, CompletedLogin, LinkIdentity},
    provider::{AuthorizeParams, CallbackParams},
    store::AuditRecord,
    tokens::FreshToken,
};

pub fn timestamp(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

impl From<pb::BeginLoginRequest> for BeginLogin {
    fn from(r: pb::BeginLoginRequest) -> Self {
        BeginLogin {
            provider: r.provider,
            redirect_uri: r.redirect_uri,
            scopes: r.scopes,
            return_to: r.return_to,
            authorize: AuthorizeParams {
                prompt: Some(r.prompt).filter(|p| !p.is_empty()),
                login_hint: Some(r.login_hint).filter(|h| !h.is_empty()),
                max_age: r.max_age,
            },
        }
    }
}

impl From<BegunLogin> for pb::BeginLoginResponse {
    fn from(b: BegunLogin) -> Self {
        pb::BeginLoginResponse {
            authorize_url: b.authorize_url,
            state: b.state.as_str(),
            expires_at: Some(timestamp(b.expires_at)),
        }
    }
}

impl From<pb::CompleteLoginRequest> for CompleteLogin {
    fn from(r: pb::CompleteLoginRequest) -> Self {
        CompleteLogin {
            state: r.state,
            code: r.code,
            error: r.error,
            error_description: r.error_description,
            callback_params: CallbackParams(r.callback_params.into_iter().collect()),
        }
    }
}

fn outcome(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::SignedIn => pb::Outcome::SignedIn,
        Outcome::UserCreated => pb::Outcome::UserCreated,
        Outcome::LinkRequired => pb::Outcome::LinkRequired,
    }
}

/// A proto timestamp as sent; the use case checks its range, so one out of
/// range is refused rather than dropped (`Moment::check`).
pub fn moment(t: Option<Timestamp>) -> Option<Moment> {
    t.map(|t| Moment {
        seconds: t.seconds,
        nanos: t.nanos,
    })
}

pub fn binding(b: Binding) -> pb::Binding {
    pb::Binding {
        user_id: b.user_id,
        provider: b.provider,
        subject: b.subject,
        created_at: Some(timestamp(b.created_at)),
        last_login_at: Some(timestamp(b.last_login_at)),
    }
}

pub fn identity(i: Identity) -> pb::Identity {
    pb::Identity {
        provider: i.provider,
        subject: i.subject,
        union_id: i.union_id.unwrap_or_default(),
        username: i.username.unwrap_or_default(),
        display_name: i.display_name.unwrap_or_default(),
        avatar_url: i.avatar_url.unwrap_or_default(),
        email: i.email.unwrap_or_default(),
        email_verified: i.email_verified,
    }
}

impl From<CompletedLogin> for pb::CompleteLoginResponse {
    fn from(c: CompletedLogin) -> Self {
        pb::CompleteLoginResponse {
            outcome: outcome(c.outcome).into(),
            binding: c.binding.map(binding),
            identity: Some(identity(c.identity)),
            return_to: c.return_to.unwrap_or_default(),
            link_ticket: c.link_ticket.map(|t| t.as_str()).unwrap_or_default(),
        }
    }
}

impl From<pb::LinkIdentityRequest> for LinkIdentity {
    fn from(r: pb::LinkIdentityRequest) -> Self {
        LinkIdentity {
            link_ticket: r.link_ticket,
            user_id: r.user_id,
        }
    }
}

impl From<login::LinkedIdentity> for pb::LinkIdentityResponse {
    fn from(l: login::LinkedIdentity) -> Self {
        pb::LinkIdentityResponse {
            binding: Some(binding(l.binding)),
            identity: Some(identity(l.identity)),
            return_to: l.return_to.unwrap_or_default(),
        }
    }
}

fn linked(l: LinkedIdentity) -> pb::LinkedIdentity {
    pb::LinkedIdentity {
        identity: Some(identity(l.identity)),
        created_at: Some(timestamp(l.created_at)),
        last_login_at: Some(timestamp(l.last_login_at)),
        has_token: l.token.is_some(),
        token_usable: l.token.unwrap_or(false),
    }
}

pub fn user(u: User) -> pb::User {
    pb::User {
        user_id: u.id,
        created_at: Some(timestamp(u.created_at)),
        identities: u.identities.into_iter().map(linked).collect(),
    }
}

pub fn provider_info(p: ProviderSummary) -> pb::ProviderInfo {
    pb::ProviderInfo {
        name: p.name,
        kind: p.kind,
        display_name: p.display_name,
        enabled: p.enabled,
        scopes: p.scopes,
        allowed_scopes: p.allowed_scopes,
        redirect_uris: p.redirect_uris,
        pkce: p.pkce,
        refresh: p.refresh,
        revoke: p.revoke,
        policy: p.policy,
        store_tokens: p.store_tokens,
    }
}

pub fn audit_event(r: AuditRecord) -> pb::AuditEvent {
    let AuditEvent {
        at,
        kind,
        actor,
        provider,
        subject,
        user_id,
        reason,
        detail,
    } = r.event;
    pb::AuditEvent {
        id: r.id,
        at: Some(timestamp(at)),
        kind: kind.as_str().into(),
        actor: actor.unwrap_or_default(),
        provider: provider.unwrap_or_default(),
        subject: subject.unwrap_or_default(),
        user_id: user_id.unwrap_or_default(),
        outcome: reason.unwrap_or_else(|| "success".into()),
        detail: detail.unwrap_or_default(),
    }
}

pub fn provider_token(t: FreshToken) -> pb::ProviderToken {
    use secrecy::ExposeSecret;
    pb::ProviderToken {
        access_token: t.access_token.expose_secret().to_string(),
        token_type: t.token_type.unwrap_or_default(),
        scopes: t.scopes,
        expires_at: t.expires_at.map(timestamp),
        refreshed: t.refreshed,
    }
}
