//! Provider tokens kept for the app: sealed at login when the provider has
//! `store_tokens`, handed out fresh by `GetProviderToken` (refreshed with the
//! provider when expired or about to be), revoked on request, and re-sealed
//! under the newest key by `rotate-keys` ([`rotation`]). No protobuf, no
//! SQL: this layer speaks the store's token, user and audit capabilities,
//! `Vault` and `Provider`.

pub mod rotation;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use moka::future::Cache;
use secrecy::SecretString;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use crate::{
    domain::{AuditEvent, AuditKind, SealedToken, now_micros},
    provider::{Provider, ProviderError, Registry, TokenSet, registry::Lookup},
    reason::Reason,
    store::{AuditLog, Conflict, StoreError, TokenStore, UserDirectory},
    vault::{Vault, VaultError, VaultTokens},
};

/// How often a refresh may lose a compare-and-swap to another replica
/// before giving up; each loss means a fresh token was just written.
const CAS_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("provider is not configured")]
    UnknownProvider,
    #[error("no such user")]
    UserNotFound,
    #[error("the user has no identity at this provider")]
    IdentityNotFound,
    #[error("no token is stored for this identity (is store_tokens on for the provider?)")]
    NotStored,
    #[error("the stored token can no longer be refreshed; the user must log in again")]
    Unusable,
    #[error(
        "the token has expired and the provider offers no way to refresh it; the user must log in again"
    )]
    Expired,
    #[error("the provider refused the refresh token; the user must log in again")]
    RefreshRejected(#[source] ProviderError),
    /// The provider refused to revoke (client authentication, a malformed
    /// request): the token may still work there, so it is kept.
    #[error(
        "the provider refused to revoke the token; it is kept so that the revocation can be retried once the client configuration is fixed"
    )]
    RevocationRefused(#[source] ProviderError),
    #[error("the stored token cannot be opened")]
    Vault(#[source] VaultError),
    #[error(transparent)]
    Provider(ProviderError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An access token the app can use now.
#[derive(Clone, Debug)]
pub struct FreshToken {
    pub access_token: SecretString,
    pub token_type: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: Option<OffsetDateTime>,
    /// Whether this call refreshed it.
    pub refreshed: bool,
}

pub struct TokenService {
    tokens: Arc<dyn TokenStore>,
    /// To find a user's identity at a provider.
    users: Arc<dyn UserDirectory>,
    audit: Arc<dyn AuditLog>,
    vault: Option<Arc<Vault>>,
    providers: Registry,
    store_tokens: HashSet<String>,
    skew: Duration,
    /// One lock per identity, so concurrent callers make one refresh (single
    /// flight). Idle locks are dropped after a while.
    flights: Cache<(String, String), Arc<Mutex<()>>>,
}

impl TokenService {
    pub fn new(
        tokens: Arc<dyn TokenStore>,
        users: Arc<dyn UserDirectory>,
        audit: Arc<dyn AuditLog>,
        vault: Option<Arc<Vault>>,
        providers: Registry,
        store_tokens: HashSet<String>,
        skew: Duration,
    ) -> Self {
        TokenService {
            tokens,
            users,
            audit,
            vault,
            providers,
            store_tokens,
            skew,
            flights: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// Seals a login's tokens if the provider keeps them; `None` otherwise.
    pub fn seal_for_login(
        &self,
        provider: &str,
        subject: &str,
        tokens: &TokenSet,
    ) -> Result<Option<SealedToken>, VaultError> {
        let Some(vault) = self
            .vault
            .as_ref()
            .filter(|_| self.store_tokens.contains(provider))
        else {
            return Ok(None);
        };
        let now = now_micros();
        vault
            .seal(
                provider,
                subject,
                &vault_tokens(tokens, None, false, now),
                now,
            )
            .map(Some)
    }

    fn provider(&self, name: &str) -> Result<&Arc<dyn Provider>, TokenError> {
        self.providers.get(name).map_err(|e| match e {
            Lookup::Unknown | Lookup::Disabled => TokenError::UnknownProvider,
        })
    }

    /// The subject of the user's identity at `provider`.
    async fn subject_of(&self, user_id: &str, provider: &str) -> Result<String, TokenError> {
        let user = self
            .users
            .get_user(user_id)
            .await?
            .ok_or(TokenError::UserNotFound)?;
        user.identities
            .into_iter()
            .find(|i| i.identity.provider == provider)
            .map(|i| i.identity.subject)
            .ok_or(TokenError::IdentityNotFound)
    }

    fn vault(&self) -> Result<&Vault, TokenError> {
        self.vault.as_deref().ok_or(TokenError::NotStored)
    }

    async fn read(
        &self,
        provider: &str,
        subject: &str,
    ) -> Result<(SealedToken, VaultTokens), TokenError> {
        let sealed = self
            .tokens
            .get_token(provider, subject)
            .await?
            .ok_or(TokenError::NotStored)?;
        if !sealed.usable {
            return Err(TokenError::Unusable);
        }
        let tokens = self
            .vault()?
            .open(provider, subject, &sealed)
            .map_err(TokenError::Vault)?;
        Ok((sealed, tokens))
    }

    fn is_fresh(&self, tokens: &VaultTokens, now: OffsetDateTime) -> bool {
        let skew = time::Duration::try_from(self.skew).unwrap_or(time::Duration::ZERO);
        tokens
            .expires_at
            .is_none_or(|at| now.checked_add(skew).is_some_and(|limit| at > limit))
    }

    /// A valid access token for the user at `provider`, refreshed with the
    /// provider when expired or within `vault.refresh_skew` of expiry.
    pub async fn fresh_token(
        &self,
        user_id: &str,
        provider_name: &str,
        actor: Option<&str>,
    ) -> Result<FreshToken, TokenError> {
        let provider = self.provider(provider_name)?.clone();
        let subject = self.subject_of(user_id, provider_name).await?;
        let (_, tokens) = self.read(provider_name, &subject).await?;
        if self.is_fresh(&tokens, OffsetDateTime::now_utc()) {
            return Ok(fresh(tokens, false));
        }
        let key = (provider_name.to_string(), subject.clone());
        let flight = self
            .flights
            .get_with(key, async { Arc::new(Mutex::new(())) })
            .await;
        let _guard = flight.lock().await;
        for _ in 0..CAS_ATTEMPTS {
            // Whoever held the lock before us may have refreshed already.
            let (sealed, tokens) = self.read(provider_name, &subject).await?;
            if self.is_fresh(&tokens, OffsetDateTime::now_utc()) {
                return Ok(fresh(tokens, false));
            }
            match self
                .refresh_once(&*provider, user_id, &subject, sealed, tokens, actor)
                .await
            {
                Err(TokenError::Store(StoreError::Conflict(Conflict::StaleToken))) => continue,
                other => return other,
            }
        }
        Err(TokenError::Store(StoreError::Conflict(
            Conflict::StaleToken,
        )))
    }

    async fn refresh_once(
        &self,
        provider: &dyn Provider,
        user_id: &str,
        subject: &str,
        sealed: SealedToken,
        old: VaultTokens,
        actor: Option<&str>,
    ) -> Result<FreshToken, TokenError> {
        let name = provider.info().name.to_string();
        let (Some(refresher), Some(refresh_token)) = (provider.refresher(), &old.refresh_token)
        else {
            return Err(TokenError::Expired);
        };
        let started = Instant::now();
        let answer = refresher.refresh(refresh_token, &old.scopes).await;
        metrics::histogram!("authbroker_token_refresh_seconds", "provider" => name.clone())
            .record(started.elapsed().as_secs_f64());
        let mut event = AuditEvent::new(AuditKind::TokenRefreshed);
        event.actor = actor.map(str::to_string);
        event.provider = Some(name.clone());
        event.subject = Some(subject.to_string());
        event.user_id = Some(user_id.to_string());
        let renewed = match answer {
            Ok(renewed) => renewed,
            Err(e @ ProviderError::Rejected { .. }) => {
                // The refresh token is dead; say so once, for every caller.
                match self
                    .tokens
                    .mark_token_unusable(&name, subject, sealed.version)
                    .await
                {
                    Ok(()) | Err(StoreError::Conflict(Conflict::StaleToken)) => {}
                    Err(other) => return Err(other.into()),
                }
                event.reason = Some(Reason::RefreshTokenRejected.as_str().into());
                self.audit(&event).await;
                return Err(TokenError::RefreshRejected(e));
            }
            Err(e) => {
                event.reason = Some(Reason::ProviderUnavailable.as_str().into());
                self.audit(&event).await;
                return Err(TokenError::Provider(e));
            }
        };
        let now = now_micros();
        // A single-use refresh token (QQ) is spent: keep only its successor.
        let keep_old_refresh = !provider.info().refresh_token_single_use;
        let tokens = vault_tokens(&renewed, Some(&old), keep_old_refresh, now);
        let new_sealed = self
            .vault()?
            .seal(&name, subject, &tokens, now)
            .map_err(TokenError::Vault)?;
        self.tokens
            .put_token(&name, subject, &new_sealed, Some(sealed.version))
            .await?;
        self.audit(&event).await;
        Ok(fresh(tokens, true))
    }

    /// Revokes the stored token at the provider where it can, then forgets
    /// it. Returns whether the provider revoked it (false: it has no
    /// revocation, or says the token is already dead). A provider that
    /// cannot be reached, or refuses the revocation, keeps the token, so
    /// the call can be retried: forgetting a token that still works would
    /// leave it live with no way left to revoke it.
    pub async fn revoke(
        &self,
        user_id: &str,
        provider_name: &str,
        actor: Option<&str>,
    ) -> Result<bool, TokenError> {
        let provider = self.provider(provider_name)?.clone();
        let subject = self.subject_of(user_id, provider_name).await?;
        let revoked = self.revoke_subject(&*provider, &subject).await?;
        self.tokens.delete_token(provider_name, &subject).await?;
        let mut event = AuditEvent::new(AuditKind::TokenRevoked);
        event.actor = actor.map(str::to_string);
        event.provider = Some(provider_name.to_string());
        event.subject = Some(subject);
        event.user_id = Some(user_id.to_string());
        event.detail = Some(if revoked { "at_provider" } else { "forgotten" }.into());
        self.audit(&event).await;
        Ok(revoked)
    }

    /// Revokes at the provider, if it can and the token opens. A token the
    /// provider already considers invalid (`invalid_token`) counts as not
    /// revoked, not failed; any other refusal is `RevocationRefused`.
    pub async fn revoke_subject(
        &self,
        provider: &dyn Provider,
        subject: &str,
    ) -> Result<bool, TokenError> {
        let name = provider.info().name.to_string();
        let sealed = self
            .tokens
            .get_token(&name, subject)
            .await?
            .ok_or(TokenError::NotStored)?;
        let Some(revoker) = provider.revoker() else {
            return Ok(false);
        };
        let tokens = self
            .vault()?
            .open(&name, subject, &sealed)
            .map_err(TokenError::Vault)?;
        match revoker.revoke(&tokens.access_token).await {
            Ok(revoked) => Ok(revoked),
            // Google answers a dead token so; RFC 7009 §2.2 answers 200.
            Err(ProviderError::Rejected { code, .. }) if code == "invalid_token" => Ok(false),
            Err(e @ ProviderError::Rejected { .. }) => Err(TokenError::RevocationRefused(e)),
            Err(e) => Err(TokenError::Provider(e)),
        }
    }

    async fn audit(&self, event: &AuditEvent) {
        if let Err(e) = self.audit.record_audit(event).await {
            tracing::warn!(error = %crate::telemetry::cause_chain(&e), kind = event.kind.as_str(), "could not record an audit event");
        }
    }
}

/// What to seal from a provider answer. `previous` fills in what a refresh
/// answer leaves out (many omit the refresh token or the scopes); its
/// refresh token only when `keep_old_refresh` (it is not single-use).
fn vault_tokens(
    tokens: &TokenSet,
    previous: Option<&VaultTokens>,
    keep_old_refresh: bool,
    now: OffsetDateTime,
) -> VaultTokens {
    let scopes = if tokens.scopes.is_empty() {
        previous.map(|p| p.scopes.clone()).unwrap_or_default()
    } else {
        tokens.scopes.clone()
    };
    VaultTokens {
        access_token: tokens.access_token.clone(),
        refresh_token: tokens.refresh_token.clone().or_else(|| {
            previous
                .filter(|_| keep_old_refresh)
                .and_then(|p| p.refresh_token.clone())
        }),
        token_type: tokens
            .token_type
            .clone()
            .or_else(|| previous.and_then(|p| p.token_type.clone())),
        scopes,
        // Providers refuse lifetimes past a century (`body::lifetime`); one
        // that still does not fit an instant has no expiry we could name,
        // and must not panic the call.
        expires_at: tokens
            .expires_in
            .and_then(|d| time::Duration::try_from(d).ok())
            .and_then(|d| now.checked_add(d)),
    }
}

fn fresh(tokens: VaultTokens, refreshed: bool) -> FreshToken {
    FreshToken {
        access_token: tokens.access_token,
        token_type: tokens.token_type,
        scopes: tokens.scopes,
        expires_at: tokens.expires_at,
        refreshed,
    }
}
