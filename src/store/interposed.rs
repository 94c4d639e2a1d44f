//! For tests: a `Store` that forwards every call to a real store and lets a
//! test act around the calls it cares about (a fault before or after a
//! login's commit, a concurrent write just before a token write). The work
//! itself is always the real store's.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    AuditLog, AuditQuery, AuditRecord, BindPolicy, BindResult, BindingStore, Database, Decide,
    LoginRecord, Store, StoreError, TokenRow, TokenStore, UserDirectory, UserQuery,
};
use crate::domain::{AuditEvent, Binding, Identity, SealedToken, User};

/// What a test does around the forwarded calls. Every method defaults to
/// doing nothing.
#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Before `bind_login` reaches the store; an error is returned instead.
    async fn before_bind(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// After `bind_login` returned (committed or not); may replace its result.
    async fn after_bind(
        &self,
        result: Result<BindResult, StoreError>,
    ) -> Result<BindResult, StoreError> {
        result
    }

    /// Before `put_token` reaches the store, with the store to act on.
    async fn before_put_token(
        &self,
        _store: &dyn Store,
        _provider: &str,
        _subject: &str,
        _expected_version: Option<i64>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

pub struct Interposed {
    inner: Arc<dyn Store>,
    hooks: Arc<dyn Hooks>,
}

impl Interposed {
    pub fn new(inner: Arc<dyn Store>, hooks: Arc<dyn Hooks>) -> Self {
        Interposed { inner, hooks }
    }
}

#[async_trait]
impl Database for Interposed {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.inner.migrate().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

#[async_trait]
impl BindingStore for Interposed {
    async fn bind_login(
        &self,
        identity: &Identity,
        policy: &BindPolicy,
        decide: Decide,
        record: LoginRecord<'_>,
    ) -> Result<BindResult, StoreError> {
        self.hooks.before_bind().await?;
        let result = self
            .inner
            .bind_login(identity, policy, decide, record)
            .await;
        self.hooks.after_bind(result).await
    }

    async fn link_identity(
        &self,
        user_id: &str,
        identity: &Identity,
        tokens: Option<&SealedToken>,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Binding, StoreError> {
        self.inner
            .link_identity(user_id, identity, tokens, actor, now)
            .await
    }

    async fn find_binding(&self, p: &str, s: &str) -> Result<Option<Binding>, StoreError> {
        self.inner.find_binding(p, s).await
    }

    async fn find_identity(&self, p: &str, s: &str) -> Result<Option<Identity>, StoreError> {
        self.inner.find_identity(p, s).await
    }
}

#[async_trait]
impl TokenStore for Interposed {
    async fn get_token(&self, p: &str, s: &str) -> Result<Option<SealedToken>, StoreError> {
        self.inner.get_token(p, s).await
    }

    async fn put_token(
        &self,
        p: &str,
        s: &str,
        token: &SealedToken,
        expected_version: Option<i64>,
    ) -> Result<i64, StoreError> {
        self.hooks
            .before_put_token(&*self.inner, p, s, expected_version)
            .await?;
        self.inner.put_token(p, s, token, expected_version).await
    }

    async fn mark_token_unusable(&self, p: &str, s: &str, v: i64) -> Result<(), StoreError> {
        self.inner.mark_token_unusable(p, s, v).await
    }

    async fn delete_token(&self, p: &str, s: &str) -> Result<bool, StoreError> {
        self.inner.delete_token(p, s).await
    }

    async fn list_tokens(
        &self,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<TokenRow>, StoreError> {
        self.inner.list_tokens(after, limit).await
    }
}

#[async_trait]
impl AuditLog for Interposed {
    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.inner.record_audit(event).await
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.list_audit_events(query).await
    }
}

#[async_trait]
impl UserDirectory for Interposed {
    async fn get_user(&self, user_id: &str) -> Result<Option<User>, StoreError> {
        self.inner.get_user(user_id).await
    }

    async fn find_user_by_identity(&self, p: &str, s: &str) -> Result<Option<User>, StoreError> {
        self.inner.find_user_by_identity(p, s).await
    }

    async fn list_users(&self, query: &UserQuery) -> Result<Vec<User>, StoreError> {
        self.inner.list_users(query).await
    }

    async fn unlink_identity(
        &self,
        user_id: &str,
        provider: &str,
        force: bool,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<User, StoreError> {
        self.inner
            .unlink_identity(user_id, provider, force, actor, now)
            .await
    }

    async fn delete_user(
        &self,
        user_id: &str,
        actor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.inner.delete_user(user_id, actor, now).await
    }

    async fn count_users(&self) -> Result<u64, StoreError> {
        self.inner.count_users().await
    }
}
