//! The contract every `Store` implementation must honour, as scenarios that
//! panic on the first broken expectation.
//!
//! Each scenario migrates the store it is given and works under its own
//! randomly named providers (and union ids, emails, user ids and time
//! windows), counting users as a difference from before it ran, so scenarios
//! pass on a fresh store and one after another on a shared one (`run_all`).
//! They must not run concurrently on one store: the user counts and "nothing
//! was written" checks would then see another scenario's writes.
//!
//! The contract is split by capability (`database`, `bindings`, `audit`,
//! `users`, `tokens`); races between writers are in `concurrency`, like
//! dex's `conformance.go` and `transactions.go`. The binding *policy* is not
//! here: every entry point takes the `Decide` its logins hand to
//! `bind_login` (callers pass `login::binding::decide`, unit-tested without
//! a store), so the suite, like the stores, never imports `login`.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use time::{Duration, OffsetDateTime, UtcOffset};

use super::{
    AuditQuery, AuditRecord, BindPolicy, BindResult, Conflict, Decide, LoginKey, LoginRecord,
    Store, StoreError, TokenRow, UserQuery,
};
use crate::domain::{
    AuditEvent, AuditKind, Binding, Identity, LinkedIdentity, Outcome, SealedToken, User,
    now_micros,
};

/// A scenario, boxed so the list below can name them all.
/// Each takes the store and the binding policy its logins apply.
pub type Scenario = fn(Arc<dyn Store>, Decide) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        /// Every scenario with its name, for `run_all`.
        pub const SCENARIOS: &[(&str, Scenario)] = &[
            $((stringify!($name), |store, decide| Box::pin($name(store, decide)))),*
        ];
    };
}

mod audit;
mod bindings;
mod concurrency;
mod database;
mod tokens;
mod users;

pub use self::{audit::*, bindings::*, concurrency::*, database::*, tokens::*, users::*};

/// Calls `$m!` with every scenario's name: the one list of them, which
/// `SCENARIOS` here and each backend's test binary (one test per scenario)
/// are both made from, so neither can miss one.
#[macro_export]
macro_rules! for_each_store_scenario {
    ($m:ident) => {
        $m!(
            migrate_is_idempotent,
            ping_answers,
            first_login_creates_user,
            returning_login_signs_in_and_refreshes_profile,
            distinct_identities_get_distinct_users,
            unknown_identity_is_absent,
            concurrent_first_logins_create_one_user,
            a_retried_login_returns_what_it_committed,
            logins_are_audited,
            audit_events_filter_order_and_limit,
            audit_events_filter_by_kind_and_time_and_page_by_id,
            text_round_trips_exactly,
            timestamps_round_trip_exactly,
            tokens_are_stored_on_login_and_replaced,
            linking_finds_the_oldest_candidate_of_each_rule,
            link_required_writes_nothing,
            concurrent_first_logins_link_once,
            link_identity_creates_the_user_and_links,
            link_identity_conflicts_write_nothing,
            concurrent_links_of_one_identity_bind_once,
            users_are_read_with_their_identities,
            list_users_filters_and_pages,
            unlink_identity_rules,
            delete_user_cascades_and_keeps_the_audit_trail,
            token_writes_compare_and_swap,
            concurrent_token_writes_one_wins,
            mark_token_unusable_compares_versions,
            list_tokens_pages_in_key_order,
        );
    };
}

for_each_store_scenario!(scenarios);

/// Runs every scenario, one after another, on one store, binding logins
/// by `decide`.
pub async fn run_all(store: Arc<dyn Store>, decide: Decide) {
    for (_, scenario) in SCENARIOS {
        scenario(Arc::clone(&store), decide).await;
    }
}

/// A provider name no other scenario (or earlier run on a shared store) uses.
fn unique_provider(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}

/// A value (union id, email local part, app user id) no other run uses.
fn unique(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}

/// A random whole second in the 1990s, where no other scenario writes: a
/// time window of a minute or so after it is this scenario's alone.
fn unique_instant() -> OffsetDateTime {
    const NINETEEN_NINETY: i64 = 631_152_000;
    const TEN_YEARS: u128 = 10 * 365 * 86_400;
    let offset = i64::try_from(uuid::Uuid::new_v4().as_u128() % TEN_YEARS).expect("fits");
    OffsetDateTime::from_unix_timestamp(NINETEEN_NINETY + offset).expect("in range")
}

fn full_identity(provider: &str, subject: &str) -> Identity {
    Identity {
        provider: provider.to_owned(),
        subject: subject.to_owned(),
        union_id: Some(format!("union-{subject}")),
        username: Some(format!("user{subject}")),
        display_name: Some(format!("User {subject}")),
        avatar_url: Some(format!("https://cdn.example.com/avatars/{subject}.png")),
        email: Some(format!("{subject}@example.com")),
        email_verified: true,
    }
}

fn minimal_identity(provider: &str, subject: &str) -> Identity {
    Identity {
        provider: provider.to_owned(),
        subject: subject.to_owned(),
        ..Identity::default()
    }
}

fn with_union(provider: &str, subject: &str, union_id: &str) -> Identity {
    Identity {
        union_id: Some(union_id.to_owned()),
        ..minimal_identity(provider, subject)
    }
}

fn with_email(provider: &str, subject: &str, email: &str, verified: bool) -> Identity {
    Identity {
        email: Some(email.to_owned()),
        email_verified: verified,
        ..minimal_identity(provider, subject)
    }
}

/// `auto_create` and nothing else: the policy of the original binding.
fn create_policy() -> BindPolicy {
    BindPolicy {
        create_user: true,
        ..BindPolicy::default()
    }
}

fn union_policy(group: &[&String], create_user: bool) -> BindPolicy {
    BindPolicy {
        create_user,
        union_group: group.iter().map(|p| (*p).clone()).collect(),
        verified_email_providers: Vec::new(),
    }
}

/// Email linking on, trusting the emails of `trusted` (the login's own
/// provider among them).
fn email_policy(trusted: &[&String], create_user: bool) -> BindPolicy {
    BindPolicy {
        create_user,
        union_group: Vec::new(),
        verified_email_providers: trusted.iter().map(|p| (*p).clone()).collect(),
    }
}

/// Sealed bytes as the vault would hand them over: binary, with NULs and
/// invalid UTF-8. Version and usability are the store's to set, so the input
/// deliberately carries wrong ones.
fn sealed(label: &str, at: OffsetDateTime) -> SealedToken {
    SealedToken {
        key_id: format!("key-{label}"),
        nonce: [label.as_bytes(), &[0, 255, 1, 0]].concat(),
        ciphertext: [&[0u8, 159, 146, 150, 255, 0][..], label.as_bytes()].concat(),
        version: -7,
        usable: false,
        updated_at: at,
    }
}

/// `token` as the store keeps it after a write that gave it `version`.
fn stored(token: &SealedToken, version: i64) -> SealedToken {
    SealedToken {
        version,
        usable: true,
        ..token.clone()
    }
}

async fn migrated(store: &Arc<dyn Store>) {
    store.migrate().await.expect("migrate");
}

async fn users(store: &Arc<dyn Store>) -> u64 {
    store.count_users().await.expect("count_users")
}

async fn login(
    store: &Arc<dyn Store>,
    decide: Decide,
    identity: &Identity,
    policy: &BindPolicy,
    tokens: Option<&SealedToken>,
    now: OffsetDateTime,
) -> BindResult {
    store
        .bind_login(
            identity,
            policy,
            decide,
            LoginRecord {
                tokens,
                actor: Some("web"),
                now,
                login: None,
            },
        )
        .await
        .expect("bind_login")
}

fn bound(result: BindResult) -> (Outcome, Binding, Option<&'static str>) {
    match result {
        BindResult::Bound {
            outcome,
            binding,
            linked_by,
        } => (outcome, binding, linked_by),
        BindResult::LinkRequired => panic!("expected a binding, got LinkRequired"),
    }
}

/// A login under `auto_create`, which always binds.
async fn bind(
    store: &Arc<dyn Store>,
    decide: Decide,
    identity: &Identity,
    actor: Option<&str>,
    now: OffsetDateTime,
) -> (Outcome, Binding) {
    let result = store
        .bind_login(
            identity,
            &create_policy(),
            decide,
            LoginRecord {
                tokens: None,
                actor,
                now,
                login: None,
            },
        )
        .await
        .expect("bind_login");
    let (outcome, binding, linked_by) = bound(result);
    assert_eq!(linked_by, None, "auto_create alone never links");
    (outcome, binding)
}

async fn audit(store: &Arc<dyn Store>, query: AuditQuery) -> Vec<AuditEvent> {
    audit_records(store, query)
        .await
        .into_iter()
        .map(|record| record.event)
        .collect()
}

async fn audit_records(store: &Arc<dyn Store>, query: AuditQuery) -> Vec<AuditRecord> {
    store
        .list_audit_events(&query)
        .await
        .expect("list_audit_events")
}

fn by_provider(provider: &str) -> AuditQuery {
    AuditQuery {
        provider: Some(provider.to_owned()),
        limit: 1000,
        ..AuditQuery::default()
    }
}

fn by_user(user_id: &str) -> AuditQuery {
    AuditQuery {
        user_id: Some(user_id.to_owned()),
        limit: 1000,
        ..AuditQuery::default()
    }
}

/// The id of the newest audit event anywhere: unchanged means nothing was
/// audited (on a store no other scenario writes to meanwhile).
async fn newest_audit_id(store: &Arc<dyn Store>) -> Option<i64> {
    let newest = audit_records(
        store,
        AuditQuery {
            limit: 1,
            ..AuditQuery::default()
        },
    )
    .await;
    newest.first().map(|record| record.id)
}

async fn get_user(store: &Arc<dyn Store>, user_id: &str) -> Option<User> {
    store.get_user(user_id).await.expect("get_user")
}

async fn token(store: &Arc<dyn Store>, provider: &str, subject: &str) -> Option<SealedToken> {
    store.get_token(provider, subject).await.expect("get_token")
}

async fn link(
    store: &Arc<dyn Store>,
    user_id: &str,
    identity: &Identity,
    tokens: Option<&SealedToken>,
    now: OffsetDateTime,
) -> Result<Binding, StoreError> {
    store
        .link_identity(user_id, identity, tokens, Some("admin"), now)
        .await
}

fn conflict<T: std::fmt::Debug>(result: Result<T, StoreError>) -> Conflict {
    match result {
        Err(StoreError::Conflict(conflict)) => conflict,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn not_found<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    match result {
        Err(StoreError::NotFound) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

fn event(
    kind: AuditKind,
    binding: &Binding,
    actor: Option<&str>,
    at: OffsetDateTime,
) -> AuditEvent {
    AuditEvent {
        at,
        kind,
        actor: actor.map(str::to_owned),
        provider: Some(binding.provider.clone()),
        subject: Some(binding.subject.clone()),
        user_id: Some(binding.user_id.clone()),
        reason: None,
        detail: None,
    }
}
