//! Domain <-> protobuf conversions. Nothing else in the crate sees `pb`.

use prost_types::Timestamp;
use time::OffsetDateTime;

use super::pb;
use crate::{
    domain::{Binding, Identity, Outcome},
    login::{BeginLogin, BegunLogin, CompleteLogin, CompletedLogin},
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
        }
    }
}

impl From<BegunLogin> for pb::BeginLoginResponse {
    fn from(b: BegunLogin) -> Self {
        pb::BeginLoginResponse {
            authorize_url: b.authorize_url.into(),
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
        }
    }
}

fn outcome(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::SignedIn => pb::Outcome::SignedIn,
        Outcome::UserCreated => pb::Outcome::UserCreated,
    }
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
            binding: Some(binding(c.binding)),
            identity: Some(identity(c.identity)),
            return_to: c.return_to.unwrap_or_default(),
            link_ticket: String::new(),
        }
    }
}
