//! The contract every `Store` implementation must honour, as scenarios that
//! panic on the first broken expectation.
//!
//! Each scenario migrates the store it is given and works under its own
//! randomly named providers (and union ids, emails, user ids and time
//! windows), counting users as a difference from before it ran, so scenarios
//! pass on a fresh store and one after another on a shared one (`run_all`).
//! They must not run concurrently on one store: the user counts and "nothing
//! was written" checks would then see another scenario's writes.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use time::{Duration, OffsetDateTime, UtcOffset};

use super::{
    AuditQuery, AuditRecord, BindPolicy, BindResult, Conflict, LoginKey, Store, StoreError,
    TokenRow, UserQuery,
};
use crate::domain::{
    AuditEvent, AuditKind, Binding, Identity, LinkedIdentity, Outcome, SealedToken, User,
    now_micros,
};

/// A scenario, boxed so the list below can name them all.
pub type Scenario = fn(Arc<dyn Store>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        /// Every scenario with its name; a backend's test binary runs each one
        /// (and checks that it covers this whole list).
        pub const SCENARIOS: &[(&str, Scenario)] = &[
            $((stringify!($name), |store| Box::pin($name(store)))),*
        ];
    };
}

scenarios!(
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
    union_id_links_within_the_group,
    union_id_takes_the_oldest_binding_and_skips_taken_users,
    verified_email_links_case_insensitively,
    verified_email_links_only_to_trusted_providers,
    unverified_emails_never_link,
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

/// Runs every scenario, one after another, on one store.
pub async fn run_all(store: Arc<dyn Store>) {
    for (_, scenario) in SCENARIOS {
        scenario(Arc::clone(&store)).await;
    }
}

/// A login whose commit's acknowledgement was lost is retried: the store
/// answers with what the first attempt committed (same outcome, same user)
/// and writes nothing more, whether the retry says so or not.
pub async fn a_retried_login_returns_what_it_committed(store: Arc<dyn Store>) {
    store.migrate().await.expect("migrate");
    let provider = unique_provider("retried");
    let identity = minimal_identity(&provider, "retried");
    let users = store.count_users().await.expect("count");
    let id = format!("login-{}", uuid::Uuid::new_v4().simple());
    let first = store
        .bind_login(
            &identity,
            &create_policy(),
            None,
            Some("web"),
            now_micros(),
            Some(LoginKey {
                id: &id,
                retry: false,
            }),
        )
        .await
        .expect("first attempt");
    let (outcome, binding, _) = bound(first.clone());
    assert_eq!(outcome, Outcome::UserCreated);
    for retry in [true, false] {
        let again = store
            .bind_login(
                &identity,
                &create_policy(),
                None,
                Some("web"),
                now_micros() + Duration::seconds(5),
                Some(LoginKey { id: &id, retry }),
            )
            .await
            .expect("retry");
        assert_eq!(
            again, first,
            "a retry (retry flag {retry}) answers what was committed"
        );
    }
    assert_eq!(store.count_users().await.expect("count"), users + 1);
    let events = store
        .list_audit_events(&AuditQuery {
            provider: Some(provider.clone()),
            kind: Some(AuditKind::LoginSucceeded),
            ..AuditQuery::default()
        })
        .await
        .expect("audit");
    assert_eq!(events.len(), 1, "one login, one login_succeeded");

    // Another login of the same identity is a returning login as usual.
    let other = format!("login-{}", uuid::Uuid::new_v4().simple());
    let next = store
        .bind_login(
            &identity,
            &create_policy(),
            None,
            Some("web"),
            now_micros(),
            Some(LoginKey {
                id: &other,
                retry: true,
            }),
        )
        .await
        .expect("next login");
    let (outcome, next_binding, _) = bound(next);
    assert_eq!(outcome, Outcome::SignedIn);
    assert_eq!(next_binding.user_id, binding.user_id);
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
    identity: &Identity,
    policy: &BindPolicy,
    tokens: Option<&SealedToken>,
    now: OffsetDateTime,
) -> BindResult {
    store
        .bind_login(identity, policy, tokens, Some("web"), now, None)
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
    identity: &Identity,
    actor: Option<&str>,
    now: OffsetDateTime,
) -> (Outcome, Binding) {
    let result = store
        .bind_login(identity, &create_policy(), None, actor, now, None)
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

pub async fn migrate_is_idempotent(store: Arc<dyn Store>) {
    // Replicas starting together migrate at the same time.
    let (a, b, c) = tokio::join!(store.migrate(), store.migrate(), store.migrate());
    a.expect("concurrent migrate");
    b.expect("concurrent migrate");
    c.expect("concurrent migrate");
    store.migrate().await.expect("second migrate");
    // The schema is usable after the second run, not merely "not an error".
    let provider = unique_provider("migrate");
    let before = users(&store).await;
    let token = sealed("migrate", now_micros());
    let (outcome, _, _) = bound(
        login(
            &store,
            &minimal_identity(&provider, "1"),
            &create_policy(),
            Some(&token),
            now_micros(),
        )
        .await,
    );
    assert_eq!(outcome, Outcome::UserCreated);
    store.migrate().await.expect("third migrate");
    assert_eq!(users(&store).await, before + 1, "migrate must keep data");
    assert_eq!(
        self::token(&store, &provider, "1").await,
        Some(stored(&token, 1)),
        "migrate must keep tokens"
    );
}

pub async fn ping_answers(store: Arc<dyn Store>) {
    store.ping().await.expect("ping before migrate");
    migrated(&store).await;
    store.ping().await.expect("ping after migrate");
}

pub async fn first_login_creates_user(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("first");
    let identity = full_identity(&provider, "1001");
    let before = users(&store).await;
    let now = now_micros();

    let (outcome, binding) = bind(&store, &identity, Some("web"), now).await;

    assert_eq!(outcome, Outcome::UserCreated);
    assert!(!binding.user_id.is_empty(), "user id must be set");
    assert_eq!(binding.provider, provider);
    assert_eq!(binding.subject, "1001");
    assert_eq!(binding.created_at, now);
    assert_eq!(binding.last_login_at, now);
    assert_eq!(users(&store).await, before + 1);

    let found = store
        .find_binding(&provider, "1001")
        .await
        .expect("find_binding");
    assert_eq!(found.as_ref(), Some(&binding));
    let stored = store
        .find_identity(&provider, "1001")
        .await
        .expect("find_identity");
    assert_eq!(stored.as_ref(), Some(&identity));
    assert_eq!(
        get_user(&store, &binding.user_id).await,
        Some(User {
            id: binding.user_id.clone(),
            created_at: now,
            identities: vec![LinkedIdentity {
                identity,
                created_at: now,
                last_login_at: now,
                token: None,
            }],
        })
    );
}

pub async fn returning_login_signs_in_and_refreshes_profile(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("returning");
    let first = full_identity(&provider, "42");
    let t0 = now_micros();
    let (_, created) = bind(&store, &first, None, t0).await;
    let before = users(&store).await;

    // The profile changed at the provider: some fields edited, some cleared,
    // one appearing for the first time.
    let second = Identity {
        union_id: None,
        username: Some("renamed".into()),
        display_name: Some("New Name".into()),
        avatar_url: None,
        email: Some("new@example.com".into()),
        email_verified: false,
        ..first.clone()
    };
    let t1 = t0 + Duration::seconds(90) + Duration::microseconds(7);
    let (outcome, binding) = bind(&store, &second, Some("web"), t1).await;

    assert_eq!(outcome, Outcome::SignedIn);
    assert_eq!(binding.user_id, created.user_id);
    assert_eq!(binding.provider, provider);
    assert_eq!(binding.subject, "42");
    assert_eq!(binding.created_at, t0, "created_at is kept");
    assert_eq!(binding.last_login_at, t1, "last_login_at moves");
    assert_eq!(users(&store).await, before, "no new user");

    let found = store
        .find_binding(&provider, "42")
        .await
        .expect("find_binding");
    assert_eq!(found.as_ref(), Some(&binding));
    let stored = store
        .find_identity(&provider, "42")
        .await
        .expect("find_identity");
    assert_eq!(stored.as_ref(), Some(&second));

    // And back from nothing to a full profile.
    let minimal = minimal_identity(&provider, "42");
    let t2 = t1 + Duration::seconds(1);
    let (outcome, _) = bind(&store, &minimal, None, t2).await;
    assert_eq!(outcome, Outcome::SignedIn);
    let stored = store
        .find_identity(&provider, "42")
        .await
        .expect("find_identity");
    assert_eq!(stored.as_ref(), Some(&minimal));
    let (outcome, binding) = bind(&store, &first, None, t2 + Duration::seconds(1)).await;
    assert_eq!(outcome, Outcome::SignedIn);
    assert_eq!(binding.user_id, created.user_id);
    let stored = store
        .find_identity(&provider, "42")
        .await
        .expect("find_identity");
    assert_eq!(stored.as_ref(), Some(&first));
}

pub async fn distinct_identities_get_distinct_users(store: Arc<dyn Store>) {
    migrated(&store).await;
    let github = unique_provider("github");
    let qq = unique_provider("qq");
    let before = users(&store).await;
    let now = now_micros();

    let (o1, a) = bind(&store, &full_identity(&github, "7"), None, now).await;
    let (o2, b) = bind(&store, &full_identity(&github, "8"), None, now).await;
    // Same subject at another provider is another person.
    let (o3, c) = bind(&store, &full_identity(&qq, "7"), None, now).await;

    assert_eq!(
        [o1, o2, o3],
        [
            Outcome::UserCreated,
            Outcome::UserCreated,
            Outcome::UserCreated
        ]
    );
    assert_ne!(a.user_id, b.user_id);
    assert_ne!(a.user_id, c.user_id);
    assert_ne!(b.user_id, c.user_id);
    assert_eq!(users(&store).await, before + 3);

    for (provider, subject, binding) in [(&github, "7", &a), (&github, "8", &b), (&qq, "7", &c)] {
        let found = store
            .find_binding(provider, subject)
            .await
            .expect("find_binding");
        assert_eq!(found.as_ref(), Some(binding));
    }
}

pub async fn unknown_identity_is_absent(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("unknown");
    assert_eq!(
        store
            .find_binding(&provider, "1")
            .await
            .expect("find_binding"),
        None
    );
    assert_eq!(
        store
            .find_identity(&provider, "1")
            .await
            .expect("find_identity"),
        None
    );
    assert_eq!(
        store
            .find_user_by_identity(&provider, "1")
            .await
            .expect("find_user_by_identity"),
        None
    );
    assert_eq!(get_user(&store, &unique("nobody")).await, None);

    // A known provider with an unknown subject, and lookups that differ only
    // in case or trailing space, are absent too.
    bind(
        &store,
        &minimal_identity(&provider, "Abc"),
        None,
        now_micros(),
    )
    .await;
    for subject in ["2", "abc", "Abc ", "ABC"] {
        assert_eq!(
            store
                .find_binding(&provider, subject)
                .await
                .expect("find_binding"),
            None,
            "subject {subject:?}"
        );
        assert_eq!(
            store
                .find_identity(&provider, subject)
                .await
                .expect("find_identity"),
            None,
            "subject {subject:?}"
        );
        assert_eq!(
            store
                .find_user_by_identity(&provider, subject)
                .await
                .expect("find_user_by_identity"),
            None,
            "subject {subject:?}"
        );
    }
    assert!(
        store
            .find_binding(&provider, "Abc")
            .await
            .expect("find_binding")
            .is_some()
    );
}

pub async fn concurrent_first_logins_create_one_user(store: Arc<dyn Store>) {
    const LOGINS: usize = 20;
    migrated(&store).await;
    let provider = unique_provider("race");
    let identity = full_identity(&provider, "race-1");
    let before = users(&store).await;
    let now = now_micros();

    // The barrier releases every task at once so their transactions overlap.
    let barrier = Arc::new(tokio::sync::Barrier::new(LOGINS));
    let tasks: Vec<_> = (0..LOGINS)
        .map(|i| {
            let store = Arc::clone(&store);
            let identity = identity.clone();
            let barrier = Arc::clone(&barrier);
            let token = sealed(&format!("race-{i}"), now);
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .bind_login(
                        &identity,
                        &create_policy(),
                        Some(&token),
                        Some("web"),
                        now,
                        None,
                    )
                    .await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(LOGINS);
    for task in tasks {
        let (outcome, binding, linked_by) = bound(task.await.expect("task").expect("bind_login"));
        assert_eq!(linked_by, None);
        results.push((outcome, binding));
    }

    assert_eq!(users(&store).await, before + 1, "exactly one user");
    let created = results
        .iter()
        .filter(|(outcome, _)| *outcome == Outcome::UserCreated)
        .count();
    assert_eq!(created, 1, "exactly one UserCreated outcome");
    let user_id = &results[0].1.user_id;
    for (_, binding) in &results {
        assert_eq!(&binding.user_id, user_id);
        assert_eq!(binding.created_at, now);
    }
    let found = store
        .find_binding(&provider, "race-1")
        .await
        .expect("find_binding")
        .expect("bound");
    assert_eq!(&found.user_id, user_id);
    // Every login wrote its token once, one after another: no write was lost
    // and the version counted them all.
    let token = token(&store, &provider, "race-1").await.expect("token");
    assert_eq!(token.version, LOGINS as i64);
    assert!(token.usable);

    let events = audit(&store, by_provider(&provider)).await;
    let count = |kind| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count(AuditKind::UserCreated), 1);
    assert_eq!(count(AuditKind::LoginSucceeded), LOGINS);
    assert_eq!(events.len(), LOGINS + 1, "nothing else is audited");
    assert!(
        events.iter().all(|e| e.user_id.as_ref() == Some(user_id)),
        "audit events must name the one user"
    );
}

pub async fn logins_are_audited(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("audited");
    let t0 = now_micros();
    let (_, binding) = bind(&store, &full_identity(&provider, "u1"), Some("web"), t0).await;

    let expected = |kind, at| event(kind, &binding, Some("web"), at);
    let by_user = AuditQuery {
        limit: 10,
        ..by_user(&binding.user_id)
    };
    // Both events share the transaction's time; the later-written one
    // (login_succeeded) comes first.
    assert_eq!(
        audit(&store, by_user.clone()).await,
        vec![
            expected(AuditKind::LoginSucceeded, t0),
            expected(AuditKind::UserCreated, t0),
        ]
    );

    // A returning login adds only login_succeeded; no actor is recorded as none.
    let t1 = t0 + Duration::seconds(5);
    bind(&store, &full_identity(&provider, "u1"), None, t1).await;
    let events = audit(&store, by_user).await;
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[0],
        AuditEvent {
            actor: None,
            ..expected(AuditKind::LoginSucceeded, t1)
        }
    );

    // A failure, recorded by the login use case, keeps its reason.
    let failed = AuditEvent {
        at: t1 + Duration::seconds(1),
        kind: AuditKind::LoginFailed,
        actor: Some("web".into()),
        provider: Some(provider.clone()),
        subject: None,
        user_id: None,
        reason: Some("PROVIDER_REJECTED".into()),
        detail: None,
    };
    store.record_audit(&failed).await.expect("record_audit");
    let by_provider = audit(
        &store,
        AuditQuery {
            limit: 1,
            ..by_provider(&provider)
        },
    )
    .await;
    assert_eq!(by_provider, vec![failed]);
}

pub async fn audit_events_filter_order_and_limit(store: Arc<dyn Store>) {
    migrated(&store).await;
    let github = unique_provider("gh");
    let qq = unique_provider("qq");
    let base = now_micros();
    let at = |s: i64| base + Duration::seconds(s);

    // Written out of time order: reads follow the order of writing (the id,
    // which is also the paging cursor), not the time.
    let (_, alice) = bind(&store, &minimal_identity(&github, "alice"), None, at(10)).await;
    let (_, bob) = bind(&store, &minimal_identity(&qq, "bob"), None, at(20)).await;
    let failure = |provider: &str, s, reason: &str| AuditEvent {
        at: at(s),
        kind: AuditKind::LoginFailed,
        actor: None,
        provider: Some(provider.to_owned()),
        subject: None,
        user_id: None,
        reason: Some(reason.to_owned()),
        detail: None,
    };
    store
        .record_audit(&failure(&github, 5, "STATE_EXPIRED"))
        .await
        .expect("record_audit");
    store
        .record_audit(&failure(&github, 15, "USER_DENIED"))
        .await
        .expect("record_audit");
    bind(&store, &minimal_identity(&github, "alice"), None, at(30)).await;

    let query = |provider: Option<&str>, user_id: Option<&str>, limit| AuditQuery {
        provider: provider.map(str::to_owned),
        user_id: user_id.map(str::to_owned),
        limit,
        ..AuditQuery::default()
    };
    let summary = |events: Vec<AuditEvent>| -> Vec<(i64, &'static str)> {
        events
            .into_iter()
            .map(|e| ((e.at - base).whole_seconds(), e.kind.as_str()))
            .collect()
    };

    let github_events = summary(audit(&store, query(Some(&github), None, 100)).await);
    assert_eq!(
        github_events,
        vec![
            (30, "login_succeeded"),
            (15, "login_failed"),
            (5, "login_failed"),
            (10, "login_succeeded"),
            (10, "user_created"),
        ]
    );
    assert_eq!(
        summary(audit(&store, query(Some(&github), None, 3)).await),
        github_events[..3].to_vec(),
        "limit keeps the newest"
    );
    assert_eq!(
        summary(audit(&store, query(Some(&github), None, 0)).await),
        github_events,
        "limit 0 means a default page, not nothing"
    );
    assert_eq!(
        summary(audit(&store, query(None, Some(&alice.user_id), 100)).await),
        vec![
            (30, "login_succeeded"),
            (10, "login_succeeded"),
            (10, "user_created"),
        ]
    );
    assert_eq!(
        summary(audit(&store, query(Some(&qq), None, 100)).await),
        vec![(20, "login_succeeded"), (20, "user_created")]
    );
    // Both filters apply together.
    assert_eq!(
        audit(&store, query(Some(&github), Some(&bob.user_id), 100)).await,
        vec![]
    );
    assert_eq!(
        summary(audit(&store, query(Some(&qq), Some(&bob.user_id), 1)).await),
        vec![(20, "login_succeeded")]
    );

    // Unfiltered reads see everything, newest (highest id) first.
    let all = audit_records(&store, query(None, None, 2)).await;
    assert_eq!(all.len(), 2);
    assert!(all[0].id > all[1].id);
}

pub async fn audit_events_filter_by_kind_and_time_and_page_by_id(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("audit-pages");
    let base = now_micros();
    let at = |s: i64| base + Duration::seconds(s);
    // (kind, seconds after base), written in this order; times are shuffled
    // so that id order and time order disagree.
    let written = [
        (AuditKind::LoginFailed, 50),
        (AuditKind::AdminCall, 10),
        (AuditKind::LoginFailed, 30),
        (AuditKind::TokenRefreshed, 20),
        (AuditKind::AdminCall, 40),
        (AuditKind::TokenRevoked, 60),
        (AuditKind::LoginFailed, 0),
    ];
    for (i, (kind, s)) in written.iter().enumerate() {
        store
            .record_audit(&AuditEvent {
                at: at(*s),
                kind: *kind,
                actor: Some("ops".into()),
                provider: Some(provider.clone()),
                subject: None,
                user_id: None,
                reason: None,
                detail: Some(format!("e{i}")),
            })
            .await
            .expect("record_audit");
    }
    let details = |records: &[AuditRecord]| -> Vec<String> {
        records
            .iter()
            .map(|r| r.event.detail.clone().unwrap_or_default())
            .collect()
    };
    let names = |list: &[usize]| -> Vec<String> { list.iter().map(|i| format!("e{i}")).collect() };

    let all = audit_records(&store, by_provider(&provider)).await;
    assert_eq!(details(&all), names(&[6, 5, 4, 3, 2, 1, 0]));
    assert!(
        all.windows(2).all(|w| w[0].id > w[1].id),
        "ids strictly decrease"
    );
    for (record, (kind, s)) in all.iter().rev().zip(written) {
        assert_eq!(record.event.kind, kind);
        assert_eq!(record.event.at, at(s));
    }

    // Paging by id: pages of three, each cursor the last id seen, until an
    // empty page; together exactly the full list.
    let mut pages = Vec::new();
    let mut before_id = None;
    loop {
        let page = audit_records(
            &store,
            AuditQuery {
                limit: 3,
                before_id,
                ..by_provider(&provider)
            },
        )
        .await;
        let Some(last) = page.last() else { break };
        before_id = Some(last.id);
        pages.push(details(&page));
        assert!(pages.len() <= 3, "paging must end");
    }
    assert_eq!(
        pages,
        vec![names(&[6, 5, 4]), names(&[3, 2, 1]), names(&[0])]
    );

    // Kind.
    let failed = AuditQuery {
        kind: Some(AuditKind::LoginFailed),
        ..by_provider(&provider)
    };
    assert_eq!(
        details(&audit_records(&store, failed.clone()).await),
        names(&[6, 2, 0])
    );
    assert_eq!(
        details(
            &audit_records(
                &store,
                AuditQuery {
                    kind: Some(AuditKind::UserDeleted),
                    ..by_provider(&provider)
                }
            )
            .await
        ),
        Vec::<String>::new()
    );
    // Time: `after` inclusive, `before` exclusive.
    let window = AuditQuery {
        after: Some(at(20)),
        before: Some(at(50)),
        ..by_provider(&provider)
    };
    assert_eq!(
        details(&audit_records(&store, window.clone()).await),
        names(&[4, 3, 2])
    );
    assert_eq!(
        details(
            &audit_records(
                &store,
                AuditQuery {
                    after: Some(at(50)),
                    ..by_provider(&provider)
                }
            )
            .await
        ),
        names(&[5, 0])
    );
    assert_eq!(
        details(
            &audit_records(
                &store,
                AuditQuery {
                    before: Some(at(10)),
                    ..by_provider(&provider)
                }
            )
            .await
        ),
        names(&[6])
    );
    // Everything together, paged.
    let first = audit_records(
        &store,
        AuditQuery {
            kind: Some(AuditKind::LoginFailed),
            limit: 1,
            ..window.clone()
        },
    )
    .await;
    assert_eq!(details(&first), names(&[2]));
    let next = audit_records(
        &store,
        AuditQuery {
            kind: Some(AuditKind::LoginFailed),
            limit: 1,
            before_id: Some(first[0].id),
            ..window
        },
    )
    .await;
    assert!(next.is_empty(), "{next:?}");
    // A cursor is only an upper bound on ids: across providers too.
    let anything_older = audit_records(
        &store,
        AuditQuery {
            before_id: Some(all[6].id),
            limit: 1000,
            ..AuditQuery::default()
        },
    )
    .await;
    assert!(anything_older.iter().all(|r| r.id < all[6].id));
    assert!(
        anything_older
            .iter()
            .all(|r| r.event.provider.as_deref() != Some(provider.as_str()))
    );
}

pub async fn text_round_trips_exactly(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = format!("{}-微信-'\"", unique_provider("text"));
    let tricky = [
        "O'Brien \"the\" \\ back\\slash; DROP TABLE users; --",
        "张三 · Zhāng Sān",
        "🦀👩🏽‍💻 emoji ZWJ",
        "tab\tnew\nline\r\n",
        "%_ like-wildcards ?1 $1",
        "",
    ];
    for (i, text) in tricky.iter().enumerate() {
        let subject = format!("{text}#{i}");
        let identity = Identity {
            provider: provider.clone(),
            subject: subject.clone(),
            union_id: Some(text.to_string()),
            username: Some(text.to_string()),
            display_name: Some(text.to_string()),
            avatar_url: Some(format!("https://example.com/a?q={text}")),
            email: Some(format!("{text}@例え.jp")),
            email_verified: i % 2 == 0,
        };
        let token = SealedToken {
            key_id: text.to_string(),
            ..sealed(text, now_micros())
        };
        let (outcome, binding, _) = bound(
            store
                .bind_login(
                    &identity,
                    &create_policy(),
                    Some(&token),
                    Some(text),
                    now_micros(),
                    None,
                )
                .await
                .expect("bind_login"),
        );
        assert_eq!(outcome, Outcome::UserCreated);
        assert_eq!(binding.subject, subject);

        let stored_identity = store
            .find_identity(&provider, &subject)
            .await
            .expect("find_identity");
        assert_eq!(stored_identity.as_ref(), Some(&identity), "text {text:?}");
        let found = store
            .find_binding(&provider, &subject)
            .await
            .expect("find_binding");
        assert_eq!(found.as_ref(), Some(&binding), "text {text:?}");
        let user = get_user(&store, &binding.user_id).await.expect("user");
        assert_eq!(user.identities[0].identity, identity, "text {text:?}");
        assert_eq!(
            self::token(&store, &provider, &subject).await,
            Some(stored(&token, 1)),
            "text {text:?}"
        );

        let events = audit(
            &store,
            AuditQuery {
                limit: 1,
                ..by_user(&binding.user_id)
            },
        )
        .await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].actor.as_deref(), Some(*text));
        assert_eq!(events[0].provider.as_deref(), Some(provider.as_str()));
        assert_eq!(events[0].subject.as_deref(), Some(subject.as_str()));
    }

    // An empty string is a value, distinct from absent.
    let stored = store
        .find_identity(&provider, "#5")
        .await
        .expect("find_identity")
        .expect("stored");
    assert_eq!(stored.display_name.as_deref(), Some(""));

    let failed = AuditEvent {
        at: now_micros(),
        kind: AuditKind::LoginFailed,
        actor: Some("ключ-API".into()),
        provider: Some(provider.clone()),
        subject: Some("☃".into()),
        user_id: None,
        reason: Some("PROVIDER_REJECTED: «nope» 🙅".into()),
        detail: Some("Admin/ListUsers ' \" -- ☃ \n".into()),
    };
    store.record_audit(&failed).await.expect("record_audit");
    let empty_detail = AuditEvent {
        detail: Some(String::new()),
        ..failed.clone()
    };
    store
        .record_audit(&empty_detail)
        .await
        .expect("record_audit");
    let events = audit(
        &store,
        AuditQuery {
            limit: 2,
            ..by_provider(&provider)
        },
    )
    .await;
    assert_eq!(events, vec![empty_detail, failed]);
}

pub async fn timestamps_round_trip_exactly(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("time");
    let utc = |nanos: i128| OffsetDateTime::from_unix_timestamp_nanos(nanos).expect("in range");
    let beijing = UtcOffset::from_hms(8, 0, 0).expect("offset");
    let moments = [
        now_micros(),
        // Microsecond digits that floating point would mangle.
        utc(981_173_106_789_012_000),
        utc(1_000_000),
        utc(-1_000),
        utc(-2_208_988_800_000_001_000),
        utc(7_258_118_399_999_999_000),
        // Same instant whatever the offset; stores may normalise to UTC.
        now_micros().to_offset(beijing),
    ];
    for (i, moment) in moments.into_iter().enumerate() {
        let subject = format!("t{i}");
        let identity = minimal_identity(&provider, &subject);
        let (_, created) = bind(&store, &identity, None, moment).await;
        assert_eq!(created.created_at, moment, "moment {i}");
        assert_eq!(created.last_login_at, moment, "moment {i}");
        let found = store
            .find_binding(&provider, &subject)
            .await
            .expect("find_binding")
            .expect("bound");
        assert_eq!(found, created, "moment {i}");
        let user = get_user(&store, &created.user_id).await.expect("user");
        assert_eq!(user.created_at, moment, "moment {i}");
        assert_eq!(user.identities[0].created_at, moment, "moment {i}");

        let later = moment + Duration::microseconds(1);
        let (_, returning) = bind(&store, &identity, None, later).await;
        let found = store
            .find_binding(&provider, &subject)
            .await
            .expect("find_binding")
            .expect("bound");
        assert_eq!(found.created_at, moment, "moment {i}");
        assert_eq!(found.last_login_at, later, "moment {i}");
        assert_eq!(found, returning, "moment {i}");

        let token = sealed(&subject, moment);
        store
            .put_token(&provider, &subject, &token, None)
            .await
            .expect("put_token");
        assert_eq!(
            self::token(&store, &provider, &subject).await,
            Some(stored(&token, 1)),
            "moment {i}"
        );

        let event = AuditEvent {
            at: moment,
            kind: AuditKind::LoginFailed,
            actor: None,
            provider: Some(format!("{provider}-audit")),
            subject: Some(subject.clone()),
            user_id: None,
            reason: Some("STATE_UNKNOWN".into()),
            detail: None,
        };
        store.record_audit(&event).await.expect("record_audit");
    }
    let audit_provider = format!("{provider}-audit");
    let events = audit(&store, by_provider(&audit_provider)).await;
    let mut read: Vec<OffsetDateTime> = events.iter().map(|e| e.at).collect();
    let mut written: Vec<OffsetDateTime> = moments.to_vec();
    read.sort();
    written.sort();
    assert_eq!(read, written, "audit times round-trip");

    // Range bounds finer than a microsecond still mean what they say about
    // whole-microsecond stored times.
    let moment = moments[0];
    let nano = Duration::nanoseconds(1);
    let count = |after: Option<OffsetDateTime>, before: Option<OffsetDateTime>| {
        let store = Arc::clone(&store);
        let audit_provider = audit_provider.clone();
        async move {
            audit(
                &store,
                AuditQuery {
                    after,
                    before,
                    ..by_provider(&audit_provider)
                },
            )
            .await
            .iter()
            .filter(|e| e.at == moment)
            .count()
        }
    };
    assert_eq!(count(Some(moment - nano), None).await, 1);
    assert_eq!(count(Some(moment), None).await, 1);
    assert_eq!(count(Some(moment + nano), None).await, 0);
    assert_eq!(count(None, Some(moment + nano)).await, 1);
    assert_eq!(count(None, Some(moment)).await, 0);

    // Sub-microsecond input: what bind_login returns is what is read back
    // later, within the microsecond the databases keep.
    let precise = utc(1_700_000_000_123_456_789);
    let identity = minimal_identity(&provider, "nanos");
    let (_, created) = bind(&store, &identity, None, precise).await;
    let found = store
        .find_binding(&provider, "nanos")
        .await
        .expect("find_binding")
        .expect("bound");
    assert_eq!(found, created);
    assert!((precise - found.created_at).abs() < Duration::microseconds(1));
}

pub async fn tokens_are_stored_on_login_and_replaced(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("tokens");
    let t0 = now_micros();
    let first = sealed("first", t0);
    let (outcome, binding, _) = bound(
        login(
            &store,
            &minimal_identity(&provider, "1"),
            &create_policy(),
            Some(&first),
            t0,
        )
        .await,
    );
    assert_eq!(outcome, Outcome::UserCreated);
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&first, 1)));
    let user = get_user(&store, &binding.user_id).await.expect("user");
    assert_eq!(user.identities[0].token, Some(true));

    // The next login brings new tokens: they replace the stored ones.
    let t1 = t0 + Duration::seconds(60);
    let second = sealed("second", t1);
    bound(
        login(
            &store,
            &minimal_identity(&provider, "1"),
            &create_policy(),
            Some(&second),
            t1,
        )
        .await,
    );
    assert_eq!(
        token(&store, &provider, "1").await,
        Some(stored(&second, 2))
    );

    // A token the provider stopped refreshing is usable again after a login
    // that brings a fresh one.
    store
        .mark_token_unusable(&provider, "1", 2)
        .await
        .expect("mark_token_unusable");
    let t2 = t1 + Duration::seconds(60);
    let third = sealed("third", t2);
    bound(
        login(
            &store,
            &minimal_identity(&provider, "1"),
            &create_policy(),
            Some(&third),
            t2,
        )
        .await,
    );
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&third, 3)));

    // A login without tokens (a provider that issues none worth keeping)
    // leaves the stored ones alone.
    bound(
        login(
            &store,
            &minimal_identity(&provider, "1"),
            &create_policy(),
            None,
            t2 + Duration::seconds(1),
        )
        .await,
    );
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&third, 3)));

    // A new identity without tokens has none.
    let (_, other, _) = bound(
        login(
            &store,
            &minimal_identity(&provider, "2"),
            &create_policy(),
            None,
            t2,
        )
        .await,
    );
    assert_eq!(token(&store, &provider, "2").await, None);
    let user = get_user(&store, &other.user_id).await.expect("user");
    assert_eq!(user.identities[0].token, None);

    // An identity linked by a rule gets its tokens too.
    let app = unique_provider("tokens-app");
    let union_id = unique("union");
    bind(&store, &with_union(&provider, "3", &union_id), None, t2).await;
    let linked_token = sealed("linked", t2);
    let (_, _, linked_by) = bound(
        login(
            &store,
            &with_union(&app, "3", &union_id),
            &union_policy(&[&provider, &app], false),
            Some(&linked_token),
            t2,
        )
        .await,
    );
    assert_eq!(linked_by, Some("union_id"));
    assert_eq!(
        token(&store, &app, "3").await,
        Some(stored(&linked_token, 1))
    );
}

pub async fn union_id_links_within_the_group(store: Arc<dyn Store>) {
    migrated(&store).await;
    let web = unique_provider("wx-web");
    let app = unique_provider("wx-app");
    let outside = unique_provider("wx-outside");
    let union_id = unique("union");
    let group = union_policy(&[&web, &app], true);
    let t0 = now_micros();

    let (outcome, owner, linked_by) = bound(
        login(
            &store,
            &with_union(&web, "openid-web", &union_id),
            &group,
            None,
            t0,
        )
        .await,
    );
    assert_eq!((outcome, linked_by), (Outcome::UserCreated, None));
    let before = users(&store).await;

    // Another app of the group, same person: bound to the same user.
    let t1 = t0 + Duration::seconds(1);
    let second = Identity {
        display_name: Some("Via the app".into()),
        ..with_union(&app, "openid-app", &union_id)
    };
    let result = login(&store, &second, &group, None, t1).await;
    let linked = Binding {
        user_id: owner.user_id.clone(),
        provider: app.clone(),
        subject: "openid-app".into(),
        created_at: t1,
        last_login_at: t1,
    };
    assert_eq!(
        result,
        BindResult::Bound {
            outcome: Outcome::SignedIn,
            binding: linked.clone(),
            linked_by: Some("union_id"),
        }
    );
    assert_eq!(users(&store).await, before, "no user is created");
    assert_eq!(
        audit(&store, by_provider(&app)).await,
        vec![
            event(AuditKind::LoginSucceeded, &linked, Some("web"), t1),
            AuditEvent {
                detail: Some("union_id".into()),
                ..event(AuditKind::IdentityLinked, &linked, Some("web"), t1)
            },
        ]
    );
    let user = get_user(&store, &owner.user_id).await.expect("user");
    let mut providers: Vec<&str> = user
        .identities
        .iter()
        .map(|l| l.identity.provider.as_str())
        .collect();
    providers.sort_unstable();
    let mut expected = vec![web.as_str(), app.as_str()];
    expected.sort_unstable();
    assert_eq!(providers, expected);
    assert_eq!(
        store
            .find_identity(&app, "openid-app")
            .await
            .expect("find_identity"),
        Some(second.clone())
    );

    // From now on it is an ordinary returning login.
    let (outcome, again, linked_by) =
        bound(login(&store, &second, &group, None, t1 + Duration::seconds(1)).await);
    assert_eq!((outcome, linked_by), (Outcome::SignedIn, None));
    assert_eq!(again.user_id, owner.user_id);

    // The same union id at a provider outside the group links nothing.
    let outsider = union_policy(&[&outside], true);
    let (outcome, stranger, linked_by) = bound(
        login(
            &store,
            &with_union(&outside, "x", &union_id),
            &outsider,
            None,
            t1,
        )
        .await,
    );
    assert_eq!((outcome, linked_by), (Outcome::UserCreated, None));
    assert_ne!(stranger.user_id, owner.user_id);

    // An empty group turns the rule off, even with a matching union id.
    let mini = unique_provider("wx-mini");
    let (outcome, _, linked_by) = bound(
        login(
            &store,
            &with_union(&mini, "m", &union_id),
            &create_policy(),
            None,
            t1,
        )
        .await,
    );
    assert_eq!((outcome, linked_by), (Outcome::UserCreated, None));

    // A different union id, or none, links nothing either.
    let (outcome, _, _) = bound(
        login(
            &store,
            &with_union(&app, "other-person", &unique("union")),
            &group,
            None,
            t1,
        )
        .await,
    );
    assert_eq!(outcome, Outcome::UserCreated);
    let (outcome, _, _) = bound(
        login(
            &store,
            &minimal_identity(&app, "no-union"),
            &group,
            None,
            t1,
        )
        .await,
    );
    assert_eq!(outcome, Outcome::UserCreated);
}

pub async fn union_id_takes_the_oldest_binding_and_skips_taken_users(store: Arc<dyn Store>) {
    migrated(&store).await;
    let a = unique_provider("ua");
    let b = unique_provider("ub");
    let c = unique_provider("uc");
    let union_id = unique("union");
    let group = union_policy(&[&a, &b, &c], true);
    let t0 = now_micros();

    // Two users carry the union id already (bound before the group was
    // configured). The older binding is written last: "oldest" is by time.
    let (_, newer) = bind(&store, &with_union(&a, "1", &union_id), None, t0).await;
    let (_, older) = bind(
        &store,
        &with_union(&b, "2", &union_id),
        None,
        t0 - Duration::seconds(10),
    )
    .await;
    let (outcome, linked, linked_by) =
        bound(login(&store, &with_union(&c, "3", &union_id), &group, None, t0).await);
    assert_eq!((outcome, linked_by), (Outcome::SignedIn, Some("union_id")));
    assert_eq!(linked.user_id, older.user_id, "the oldest binding wins");

    // The oldest binding's user has an identity at `c` now, so the rule does
    // not apply to another `c` identity (it does not move on to the next
    // user): without auto_create the app must link...
    let before = users(&store).await;
    let no_create = union_policy(&[&a, &b, &c], false);
    assert_eq!(
        login(
            &store,
            &with_union(&c, "4", &union_id),
            &no_create,
            None,
            t0
        )
        .await,
        BindResult::LinkRequired
    );
    // ...and with it a new user is made.
    let (outcome, fresh, linked_by) =
        bound(login(&store, &with_union(&c, "4", &union_id), &group, None, t0).await);
    assert_eq!((outcome, linked_by), (Outcome::UserCreated, None));
    assert_ne!(fresh.user_id, older.user_id);
    assert_ne!(fresh.user_id, newer.user_id);
    assert_eq!(users(&store).await, before + 1);
    let older_user = get_user(&store, &older.user_id).await.expect("user");
    assert_eq!(older_user.identities.len(), 2, "b and c only");
}

pub async fn verified_email_links_case_insensitively(store: Arc<dyn Store>) {
    migrated(&store).await;
    let github = unique_provider("em-github");
    let gitee = unique_provider("em-gitee");
    let google = unique_provider("em-google");
    let local = unique("ada");
    let t0 = now_micros();

    let (_, owner) = bind(
        &store,
        &with_email(
            &github,
            "1",
            &format!("{}@Example.COM", local.to_uppercase()),
            true,
        ),
        None,
        t0,
    )
    .await;
    let before = users(&store).await;

    let t1 = t0 + Duration::seconds(1);
    let result = login(
        &store,
        // Neither side's spelling is lower case: both are folded.
        &with_email(&gitee, "77", &format!("A{}@eXample.com", &local[1..]), true),
        &email_policy(&[&github, &gitee], false),
        None,
        t1,
    )
    .await;
    let linked = Binding {
        user_id: owner.user_id.clone(),
        provider: gitee.clone(),
        subject: "77".into(),
        created_at: t1,
        last_login_at: t1,
    };
    assert_eq!(
        result,
        BindResult::Bound {
            outcome: Outcome::SignedIn,
            binding: linked.clone(),
            linked_by: Some("verified_email"),
        }
    );
    assert_eq!(users(&store).await, before);
    assert_eq!(
        audit(&store, by_provider(&gitee)).await,
        vec![
            event(AuditKind::LoginSucceeded, &linked, Some("web"), t1),
            AuditEvent {
                detail: Some("verified_email".into()),
                ..event(AuditKind::IdentityLinked, &linked, Some("web"), t1)
            },
        ]
    );

    // With the rule off, the same verified email makes a new user.
    let (outcome, other, _) = bound(
        login(
            &store,
            &with_email(&google, "5", &format!("{local}@example.com"), true),
            &create_policy(),
            None,
            t1,
        )
        .await,
    );
    assert_eq!(outcome, Outcome::UserCreated);
    assert_ne!(other.user_id, owner.user_id);

    // The oldest binding's user already has a github identity: a second
    // github account with that email is not folded into them.
    let (outcome, second_github, linked_by) = bound(
        login(
            &store,
            &with_email(&github, "2", &format!("{local}@EXAMPLE.com"), true),
            &email_policy(&[&github], true),
            None,
            t1,
        )
        .await,
    );
    assert_eq!((outcome, linked_by), (Outcome::UserCreated, None));
    assert_ne!(second_github.user_id, owner.user_id);

    // Union id is tried before email: with both matching different users,
    // the union id's user wins.
    let wx = unique_provider("em-wx");
    let wx_app = unique_provider("em-wx-app");
    let union_id = unique("union");
    let (_, union_owner) = bind(&store, &with_union(&wx, "u", &union_id), None, t0).await;
    let both = Identity {
        union_id: Some(union_id.clone()),
        ..with_email(&wx_app, "b", &format!("{local}@example.com"), true)
    };
    let policy = BindPolicy {
        create_user: false,
        union_group: vec![wx.clone(), wx_app.clone()],
        verified_email_providers: vec![github.clone(), wx_app.clone()],
    };
    let (_, binding, linked_by) = bound(login(&store, &both, &policy, None, t1).await);
    assert_eq!(linked_by, Some("union_id"));
    assert_eq!(binding.user_id, union_owner.user_id);

    // When the union id's user is taken, email is tried next.
    let both_again = Identity {
        union_id: Some(union_id),
        ..with_email(&wx_app, "c", &format!("{local}@example.com"), true)
    };
    let (_, binding, linked_by) = bound(login(&store, &both_again, &policy, None, t1).await);
    assert_eq!(linked_by, Some("verified_email"));
    assert_eq!(binding.user_id, owner.user_id);
}

/// The takeover that email linking must not allow: someone signs up at a
/// provider that is not trusted for email linking and reports the victim's
/// address as verified. The victim's later first login at a trusted
/// provider must not join that user, though it is the oldest binding of the
/// address; it joins only identities of trusted providers.
pub async fn verified_email_links_only_to_trusted_providers(store: Arc<dyn Store>) {
    migrated(&store).await;
    let untrusted = unique_provider("tk-untrusted");
    let trusted = unique_provider("tk-trusted");
    let also_trusted = unique_provider("tk-trusted2");
    let email = format!("{}@example.com", unique("victim"));
    let policy = |create_user| email_policy(&[&trusted, &also_trusted], create_user);
    let t0 = now_micros();

    // The untrusted provider's policy has email linking off.
    let (outcome, attacker, _) = bound(
        login(
            &store,
            &with_email(&untrusted, "attacker", &email, true),
            &create_policy(),
            None,
            t0,
        )
        .await,
    );
    assert_eq!(outcome, Outcome::UserCreated);

    // Only the untrusted identity matches: nothing links.
    let t1 = t0 + Duration::seconds(1);
    assert_eq!(
        login(
            &store,
            &with_email(&trusted, "victim", &email.to_uppercase(), true),
            &policy(false),
            None,
            t1,
        )
        .await,
        BindResult::LinkRequired,
        "an untrusted provider's identity is no candidate"
    );
    let (outcome, victim, linked_by) = bound(
        login(
            &store,
            &with_email(&trusted, "victim", &email, true),
            &policy(true),
            None,
            t1,
        )
        .await,
    );
    assert_eq!((outcome, linked_by), (Outcome::UserCreated, None));
    assert_ne!(victim.user_id, attacker.user_id, "no takeover");

    // Another trusted provider joins the victim's user, though the
    // attacker's binding of the address is older.
    let t2 = t1 + Duration::seconds(1);
    let (outcome, joined, linked_by) = bound(
        login(
            &store,
            &with_email(&also_trusted, "victim", &email, true),
            &policy(false),
            None,
            t2,
        )
        .await,
    );
    assert_eq!(
        (outcome, linked_by),
        (Outcome::SignedIn, Some("verified_email"))
    );
    assert_eq!(joined.user_id, victim.user_id);
    let attacker_user = get_user(&store, &attacker.user_id).await.expect("user");
    assert_eq!(
        attacker_user.identities.len(),
        1,
        "the attacker gained nothing"
    );
}

pub async fn unverified_emails_never_link(store: Arc<dyn Store>) {
    migrated(&store).await;
    let p1 = unique_provider("uv1");
    let p2 = unique_provider("uv2");
    let email = format!("{}@example.com", unique("bob"));
    let t0 = now_micros();

    // The only identity with that email never verified it: no candidate.
    bind(&store, &with_email(&p1, "1", &email, false), None, t0).await;
    assert_eq!(
        login(
            &store,
            &with_email(&p2, "1", &email, true),
            &email_policy(&[&p1, &p2], false),
            None,
            t0
        )
        .await,
        BindResult::LinkRequired
    );

    // A verified candidate, but the login's own email is unverified.
    let verified = format!("{}@example.com", unique("carol"));
    bind(&store, &with_email(&p1, "2", &verified, true), None, t0).await;
    assert_eq!(
        login(
            &store,
            &with_email(&p2, "2", &verified, false),
            &email_policy(&[&p1, &p2], false),
            None,
            t0
        )
        .await,
        BindResult::LinkRequired
    );
    // No email at all.
    assert_eq!(
        login(
            &store,
            &minimal_identity(&p2, "3"),
            &email_policy(&[&p1, &p2], false),
            None,
            t0
        )
        .await,
        BindResult::LinkRequired
    );
    // And verified on both sides it does link (the setup above is right).
    let (_, _, linked_by) = bound(
        login(
            &store,
            &with_email(&p2, "2", &verified, true),
            &email_policy(&[&p1, &p2], false),
            None,
            t0,
        )
        .await,
    );
    assert_eq!(linked_by, Some("verified_email"));
}

pub async fn link_required_writes_nothing(store: Arc<dyn Store>) {
    migrated(&store).await;
    let web = unique_provider("lr-web");
    let app = unique_provider("lr-app");
    let union_id = unique("union");
    let email = format!("{}@example.com", unique("dave"));
    let t0 = now_micros();

    // A candidate for both rules, whose user already has an `app` identity.
    let (_, owner) = bind(
        &store,
        &Identity {
            union_id: Some(union_id.clone()),
            ..with_email(&web, "w", &email, true)
        },
        None,
        t0,
    )
    .await;
    let (_, _) = bind(&store, &minimal_identity(&app, "taken"), None, t0).await;
    link(
        &store,
        &owner.user_id,
        &minimal_identity(&app, "mine"),
        None,
        t0,
    )
    .await
    .expect("link");
    let owner_before = get_user(&store, &owner.user_id).await;

    let users_before = users(&store).await;
    let audit_before = newest_audit_id(&store).await;
    let token = sealed("never", t0);
    let cases = [
        (minimal_identity(&app, "1"), BindPolicy::default()),
        (
            Identity {
                union_id: Some(union_id.clone()),
                ..with_email(&app, "2", &email, true)
            },
            BindPolicy {
                create_user: false,
                union_group: vec![web.clone(), app.clone()],
                verified_email_providers: vec![web.clone(), app.clone()],
            },
        ),
    ];
    for (identity, policy) in &cases {
        for _ in 0..2 {
            let result = store
                .bind_login(identity, policy, Some(&token), Some("web"), t0, None)
                .await
                .expect("bind_login");
            assert_eq!(result, BindResult::LinkRequired, "{identity:?}");
        }
        let (provider, subject) = (&identity.provider, &identity.subject);
        assert_eq!(
            store
                .find_binding(provider, subject)
                .await
                .expect("find_binding"),
            None
        );
        assert_eq!(
            store
                .find_identity(provider, subject)
                .await
                .expect("find_identity"),
            None
        );
        assert_eq!(self::token(&store, provider, subject).await, None);
    }
    assert_eq!(users(&store).await, users_before, "no user");
    assert_eq!(
        newest_audit_id(&store).await,
        audit_before,
        "not even an audit event"
    );
    assert_eq!(
        get_user(&store, &owner.user_id).await,
        owner_before,
        "the candidate is untouched"
    );
    let listed = store
        .list_users(&UserQuery {
            provider: Some(app.clone()),
            ..UserQuery::default()
        })
        .await
        .expect("list_users");
    assert_eq!(listed.len(), 2, "only the two identities bound above");
}

pub async fn concurrent_first_logins_link_once(store: Arc<dyn Store>) {
    const LOGINS: usize = 10;
    migrated(&store).await;
    let web = unique_provider("cl-web");
    let app = unique_provider("cl-app");
    let union_id = unique("union");
    let group = union_policy(&[&web, &app], true);
    let t0 = now_micros();
    let (_, owner) = bind(&store, &with_union(&web, "w", &union_id), None, t0).await;
    let before = users(&store).await;

    let identity = with_union(&app, "a", &union_id);
    let barrier = Arc::new(tokio::sync::Barrier::new(LOGINS));
    let tasks: Vec<_> = (0..LOGINS)
        .map(|_| {
            let (store, identity, group, barrier) = (
                Arc::clone(&store),
                identity.clone(),
                group.clone(),
                Arc::clone(&barrier),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .bind_login(&identity, &group, None, None, t0, None)
                    .await
            })
        })
        .collect();
    let mut linked = 0;
    for task in tasks {
        let (outcome, binding, linked_by) = bound(task.await.expect("task").expect("bind_login"));
        assert_eq!(outcome, Outcome::SignedIn);
        assert_eq!(binding.user_id, owner.user_id);
        if linked_by.is_some() {
            assert_eq!(linked_by, Some("union_id"));
            linked += 1;
        }
    }
    assert_eq!(linked, 1, "exactly one login linked the identity");
    assert_eq!(users(&store).await, before, "no user is created");
    let events = audit(&store, by_provider(&app)).await;
    let count = |kind| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count(AuditKind::IdentityLinked), 1);
    assert_eq!(count(AuditKind::LoginSucceeded), LOGINS);
    assert_eq!(count(AuditKind::UserCreated), 0);

    // Different identities at one provider racing for the one free slot of
    // the union id's user: one takes it, the others find it taken and fall
    // through to making their own users — none fails.
    let union_id = unique("union");
    let (_, owner) = bind(&store, &with_union(&web, "w2", &union_id), None, t0).await;
    let before = users(&store).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(LOGINS));
    let tasks: Vec<_> = (0..LOGINS)
        .map(|i| {
            let identity = with_union(&app, &format!("slot-{i}"), &union_id);
            let (store, group, barrier) = (Arc::clone(&store), group.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .bind_login(&identity, &group, None, None, t0, None)
                    .await
            })
        })
        .collect();
    let mut linked = 0;
    let mut created = HashSet::new();
    for task in tasks {
        match bound(task.await.expect("task").expect("bind_login")) {
            (Outcome::SignedIn, binding, Some("union_id")) => {
                assert_eq!(binding.user_id, owner.user_id);
                linked += 1;
            }
            (Outcome::UserCreated, binding, None) => {
                assert!(created.insert(binding.user_id));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(linked, 1, "one identity takes the slot");
    assert_eq!(created.len(), LOGINS - 1);
    assert_eq!(users(&store).await, before + LOGINS as u64 - 1);
    let owner_now = get_user(&store, &owner.user_id).await.expect("user");
    assert_eq!(owner_now.identities.len(), 2);
}

pub async fn link_identity_creates_the_user_and_links(store: Arc<dyn Store>) {
    migrated(&store).await;
    let p1 = unique_provider("li1");
    let p2 = unique_provider("li2");
    let app_user = unique("app-user");
    let t0 = now_micros();
    assert_eq!(get_user(&store, &app_user).await, None);
    let before = users(&store).await;

    let identity = full_identity(&p1, "1");
    let token = sealed("link", t0);
    let binding = link(&store, &app_user, &identity, Some(&token), t0)
        .await
        .expect("link");
    let expected_binding = Binding {
        user_id: app_user.clone(),
        provider: p1.clone(),
        subject: "1".into(),
        created_at: t0,
        last_login_at: t0,
    };
    assert_eq!(binding, expected_binding);
    assert_eq!(users(&store).await, before + 1, "the user row is made");
    assert_eq!(
        get_user(&store, &app_user).await,
        Some(User {
            id: app_user.clone(),
            created_at: t0,
            identities: vec![LinkedIdentity {
                identity: identity.clone(),
                created_at: t0,
                last_login_at: t0,
                token: Some(true),
            }],
        })
    );
    assert_eq!(self::token(&store, &p1, "1").await, Some(stored(&token, 1)));
    assert_eq!(
        audit(&store, by_user(&app_user)).await,
        vec![
            event(AuditKind::IdentityLinked, &binding, Some("admin"), t0),
            event(AuditKind::UserCreated, &binding, Some("admin"), t0),
        ]
    );

    // Linking again is idempotent: the profile is refreshed, the binding
    // (and its last login) kept, nothing audited.
    let renamed = Identity {
        display_name: Some("Renamed".into()),
        email_verified: false,
        ..identity.clone()
    };
    let t1 = t0 + Duration::seconds(30);
    let again = link(&store, &app_user, &renamed, None, t1)
        .await
        .expect("relink");
    assert_eq!(again, expected_binding);
    assert_eq!(
        store.find_identity(&p1, "1").await.expect("find_identity"),
        Some(renamed)
    );
    assert_eq!(audit(&store, by_user(&app_user)).await.len(), 2);
    assert_eq!(
        self::token(&store, &p1, "1").await,
        Some(stored(&token, 1)),
        "no tokens given: kept"
    );

    // A second provider for an existing user: no user_created this time.
    let t2 = t1 + Duration::seconds(30);
    let second = link(&store, &app_user, &minimal_identity(&p2, "2"), None, t2)
        .await
        .expect("second link");
    assert_eq!(second.created_at, t2);
    assert_eq!(users(&store).await, before + 1);
    let events = audit(&store, by_user(&app_user)).await;
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[0],
        event(AuditKind::IdentityLinked, &second, Some("admin"), t2)
    );
    let user = get_user(&store, &app_user).await.expect("user");
    assert_eq!(user.identities.len(), 2);
    assert_eq!(user.created_at, t0);

    // The linked identity now signs in to the app's user.
    let (outcome, signed_in) = bind(&store, &minimal_identity(&p2, "2"), None, t2).await;
    assert_eq!(outcome, Outcome::SignedIn);
    assert_eq!(signed_in.user_id, app_user);

    // An existing user made by a login can be linked to as well.
    let (_, made) = bind(&store, &minimal_identity(&p1, "9"), None, t0).await;
    let onto = link(&store, &made.user_id, &minimal_identity(&p2, "9"), None, t2)
        .await
        .expect("link to a login-made user");
    assert_eq!(onto.user_id, made.user_id);
    let user_events = audit(&store, by_user(&made.user_id)).await;
    assert_eq!(
        user_events
            .iter()
            .filter(|e| e.kind == AuditKind::UserCreated)
            .count(),
        1,
        "only the login created the user"
    );
}

pub async fn link_identity_conflicts_write_nothing(store: Arc<dyn Store>) {
    migrated(&store).await;
    let p1 = unique_provider("lc1");
    let p2 = unique_provider("lc2");
    let t0 = now_micros();
    let (_, a) = bind(&store, &minimal_identity(&p1, "1"), None, t0).await;
    let (_, b) = bind(&store, &minimal_identity(&p2, "1"), None, t0).await;
    let a_before = get_user(&store, &a.user_id).await;
    let b_before = get_user(&store, &b.user_id).await;
    let users_before = users(&store).await;
    let audit_before = newest_audit_id(&store).await;
    let token = sealed("conflict", t0);

    // Bound to another user: to a new app user (whose row must not be left
    // behind) and to an existing one.
    let newcomer = unique("app-user");
    assert_eq!(
        conflict(
            link(
                &store,
                &newcomer,
                &minimal_identity(&p1, "1"),
                Some(&token),
                t0
            )
            .await
        ),
        Conflict::IdentityLinkedElsewhere
    );
    assert_eq!(get_user(&store, &newcomer).await, None);
    assert_eq!(
        conflict(link(&store, &b.user_id, &minimal_identity(&p1, "1"), None, t0).await),
        Conflict::IdentityLinkedElsewhere
    );

    // The user already has another identity at that provider.
    assert_eq!(
        conflict(
            link(
                &store,
                &a.user_id,
                &minimal_identity(&p1, "2"),
                Some(&token),
                t0
            )
            .await
        ),
        Conflict::ProviderAlreadyLinked
    );
    assert_eq!(
        store.find_binding(&p1, "2").await.expect("find_binding"),
        None
    );

    assert_eq!(users(&store).await, users_before);
    assert_eq!(newest_audit_id(&store).await, audit_before);
    assert_eq!(get_user(&store, &a.user_id).await, a_before);
    assert_eq!(get_user(&store, &b.user_id).await, b_before);
    assert_eq!(
        store.find_binding(&p1, "1").await.expect("find_binding"),
        Some(a)
    );
    assert_eq!(self::token(&store, &p1, "1").await, None);
}

pub async fn concurrent_links_of_one_identity_bind_once(store: Arc<dyn Store>) {
    const ROUNDS: usize = 4;
    const CONTENDERS: usize = 6;
    migrated(&store).await;
    for round in 0..ROUNDS {
        let provider = unique_provider("contested");
        let identity = minimal_identity(&provider, "x");
        let now = now_micros();
        // Even rounds: app user ids not yet stored (each link also creates its
        // user); odd rounds: existing users.
        let mut contenders = Vec::new();
        for i in 0..CONTENDERS {
            if round % 2 == 0 {
                contenders.push(unique("app-user"));
            } else {
                let home = unique_provider("home");
                let (_, made) =
                    bind(&store, &minimal_identity(&home, &i.to_string()), None, now).await;
                contenders.push(made.user_id);
            }
        }
        let before = users(&store).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(CONTENDERS));
        let tasks: Vec<_> = contenders
            .iter()
            .map(|user_id| {
                let (store, identity, barrier, user_id) = (
                    Arc::clone(&store),
                    identity.clone(),
                    Arc::clone(&barrier),
                    user_id.clone(),
                );
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .link_identity(&user_id, &identity, None, None, now)
                        .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for (task, user_id) in tasks.into_iter().zip(&contenders) {
            match task.await.expect("task") {
                Ok(binding) => {
                    assert_eq!(&binding.user_id, user_id);
                    winners.push(binding);
                }
                Err(e) => assert_eq!(conflict::<()>(Err(e)), Conflict::IdentityLinkedElsewhere),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one link wins");
        let winner = &winners[0];
        assert_eq!(
            store
                .find_binding(&provider, "x")
                .await
                .expect("find_binding")
                .as_ref(),
            Some(winner)
        );
        let created = if round % 2 == 0 { 1 } else { 0 };
        assert_eq!(
            users(&store).await,
            before + created,
            "round {round}: the losers' new user rows are rolled back"
        );
        let linked = audit(&store, by_provider(&provider)).await;
        assert_eq!(
            linked
                .iter()
                .filter(|e| e.kind == AuditKind::IdentityLinked)
                .count(),
            1
        );
    }

    // Concurrent links of one identity to the same user all succeed, with
    // one user row and one identity_linked between them.
    let provider = unique_provider("same");
    let identity = minimal_identity(&provider, "x");
    let user_id = unique("app-user");
    let now = now_micros();
    let before = users(&store).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(CONTENDERS));
    let tasks: Vec<_> = (0..CONTENDERS)
        .map(|_| {
            let (store, identity, barrier, user_id) = (
                Arc::clone(&store),
                identity.clone(),
                Arc::clone(&barrier),
                user_id.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .link_identity(&user_id, &identity, None, None, now)
                    .await
            })
        })
        .collect();
    for task in tasks {
        let binding = task.await.expect("task").expect("same-user link");
        assert_eq!(binding.user_id, user_id);
        assert_eq!(binding.created_at, now);
    }
    assert_eq!(users(&store).await, before + 1);
    let events = audit(&store, by_user(&user_id)).await;
    let kinds: Vec<AuditKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![AuditKind::IdentityLinked, AuditKind::UserCreated]
    );
}

pub async fn users_are_read_with_their_identities(store: Arc<dyn Store>) {
    migrated(&store).await;
    // Names whose order is the same under any collation.
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (pa, pb, pc) = (format!("ra{tag}"), format!("rb{tag}"), format!("rc{tag}"));
    let t0 = now_micros();
    let (tb, tc) = (t0 + Duration::seconds(1), t0 + Duration::seconds(2));

    // Made by a login at `c`, then given `a` and `b`, out of provider order.
    let c = full_identity(&pc, "3");
    let (_, made) = bind(&store, &c, None, t0).await;
    let b = minimal_identity(&pb, "2");
    link(&store, &made.user_id, &b, Some(&sealed("b", tb)), tb)
        .await
        .expect("link b");
    store
        .mark_token_unusable(&pb, "2", 1)
        .await
        .expect("mark_token_unusable");
    let a = full_identity(&pa, "1");
    link(&store, &made.user_id, &a, Some(&sealed("a", tc)), tc)
        .await
        .expect("link a");
    let later = tc + Duration::seconds(5);
    bind(&store, &c, None, later).await;

    let expected = User {
        id: made.user_id.clone(),
        created_at: t0,
        identities: vec![
            LinkedIdentity {
                identity: a,
                created_at: tc,
                last_login_at: tc,
                token: Some(true),
            },
            LinkedIdentity {
                identity: b,
                created_at: tb,
                last_login_at: tb,
                token: Some(false),
            },
            LinkedIdentity {
                identity: c,
                created_at: t0,
                last_login_at: later,
                token: None,
            },
        ],
    };
    assert_eq!(
        get_user(&store, &made.user_id).await,
        Some(expected.clone())
    );
    for (provider, subject) in [(&pa, "1"), (&pb, "2"), (&pc, "3")] {
        assert_eq!(
            store
                .find_user_by_identity(provider, subject)
                .await
                .expect("find_user_by_identity"),
            Some(expected.clone())
        );
    }
    let listed = store
        .list_users(&UserQuery {
            provider: Some(pb.clone()),
            ..UserQuery::default()
        })
        .await
        .expect("list_users");
    assert_eq!(listed, vec![expected]);
}

pub async fn list_users_filters_and_pages(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("list");
    let other = unique_provider("list-other");
    let base = unique_instant();
    let at = |s: i64| base + Duration::seconds(s);

    // Seven users at `provider`, three of them made in the same microsecond
    // (the id breaks the tie), written out of time order.
    let mut made = Vec::new();
    for (i, s) in [30, 0, 40, 10, 30, 20, 30].into_iter().enumerate() {
        let (_, binding) = bind(
            &store,
            &minimal_identity(&provider, &format!("s{i}")),
            None,
            at(s),
        )
        .await;
        made.push(binding.user_id);
    }
    // One user from elsewhere who also has an identity at `provider`, one
    // who has none.
    let (_, both) = bind(&store, &minimal_identity(&other, "both"), None, at(25)).await;
    link(
        &store,
        &both.user_id,
        &minimal_identity(&provider, "both"),
        None,
        at(26),
    )
    .await
    .expect("link");
    let (_, elsewhere) = bind(&store, &minimal_identity(&other, "only"), None, at(35)).await;

    let list = |query: UserQuery| {
        let store = Arc::clone(&store);
        async move { store.list_users(&query).await.expect("list_users") }
    };
    let ids = |users: &[User]| -> Vec<String> { users.iter().map(|u| u.id.clone()).collect() };
    let newest_first = |mut users: Vec<(OffsetDateTime, String)>| -> Vec<String> {
        users.sort_by(|x, y| y.cmp(x));
        users.into_iter().map(|(_, id)| id).collect()
    };

    let at_provider = UserQuery {
        provider: Some(provider.clone()),
        ..UserQuery::default()
    };
    let all = list(at_provider.clone()).await;
    let mut expected: Vec<(OffsetDateTime, String)> = Vec::new();
    for user_id in made.iter().chain([&both.user_id]) {
        let user = get_user(&store, user_id).await.expect("user");
        expected.push((user.created_at, user.id));
    }
    assert_eq!(ids(&all), newest_first(expected.clone()));
    // Each listed user is complete, exactly as get_user reads them.
    for user in &all {
        assert_eq!(Some(user), get_user(&store, &user.id).await.as_ref());
    }
    let both_listed = all.iter().find(|u| u.id == both.user_id).expect("listed");
    assert_eq!(
        both_listed.identities.len(),
        2,
        "all identities, not just the filter's"
    );
    assert_eq!(
        ids(&list(UserQuery {
            limit: 0,
            ..at_provider.clone()
        })
        .await),
        ids(&all),
        "limit 0 is the default page"
    );

    // Pages of three, each cursor the last user seen: the same users in the
    // same order, no duplicates and no gaps — across the three-way tie.
    let mut paged = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let page = list(UserQuery {
            limit: 3,
            after: after.clone(),
            ..at_provider.clone()
        })
        .await;
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.id.clone()));
        paged.extend(page);
    }
    assert_eq!(paged, all);
    let unique_ids: HashSet<&String> = paged.iter().map(|u| &u.id).collect();
    assert_eq!(unique_ids.len(), all.len());

    // Time window: from (inclusive) and until (exclusive).
    let window = list(UserQuery {
        created_after: Some(at(20)),
        created_before: Some(at(40)),
        ..at_provider.clone()
    })
    .await;
    let in_window: Vec<(OffsetDateTime, String)> = expected
        .iter()
        .filter(|(t, _)| *t >= at(20) && *t < at(40))
        .cloned()
        .collect();
    assert_eq!(ids(&window), newest_first(in_window));
    assert_eq!(window.len(), 5, "20, 25 and the three at 30");

    // Without a provider filter, the window (this scenario's alone) also
    // holds the user with no identity at `provider`; paged by two.
    let whole = UserQuery {
        created_after: Some(base),
        created_before: Some(at(41)),
        ..UserQuery::default()
    };
    let everyone = list(whole.clone()).await;
    let mut with_elsewhere = expected.clone();
    with_elsewhere.push((at(35), elsewhere.user_id.clone()));
    assert_eq!(ids(&everyone), newest_first(with_elsewhere));
    let mut paged = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let page = list(UserQuery {
            limit: 2,
            after: after.clone(),
            ..whole.clone()
        })
        .await;
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.id.clone()));
        paged.extend(page);
    }
    assert_eq!(paged, everyone);

    // A provider nobody uses lists nobody.
    assert!(
        list(UserQuery {
            provider: Some(unique_provider("nobody")),
            ..UserQuery::default()
        })
        .await
        .is_empty()
    );
}

pub async fn unlink_identity_rules(store: Arc<dyn Store>) {
    migrated(&store).await;
    let p1 = unique_provider("ul1");
    let p2 = unique_provider("ul2");
    let p3 = unique_provider("ul3");
    let t0 = now_micros();
    let t1 = t0 + Duration::seconds(10);

    not_found(
        store
            .unlink_identity(&unique("nobody"), &p1, true, None, t1)
            .await,
    );

    let one = sealed("one", t0);
    let (_, made, _) = bound(
        login(
            &store,
            &minimal_identity(&p1, "1"),
            &create_policy(),
            Some(&one),
            t0,
        )
        .await,
    );
    let user_id = made.user_id.clone();
    link(
        &store,
        &user_id,
        &minimal_identity(&p2, "2"),
        Some(&sealed("two", t0)),
        t0,
    )
    .await
    .expect("link");
    let users_before = users(&store).await;

    // No identity at that provider.
    not_found(store.unlink_identity(&user_id, &p3, false, None, t1).await);

    // One of two: removed with its token, the other kept.
    let user = store
        .unlink_identity(&user_id, &p1, false, Some("admin"), t1)
        .await
        .expect("unlink");
    assert_eq!(user.id, user_id);
    assert_eq!(user.created_at, t0);
    assert_eq!(user.identities.len(), 1);
    assert_eq!(user.identities[0].identity.provider, p2);
    assert_eq!(get_user(&store, &user_id).await, Some(user));
    assert_eq!(
        store.find_binding(&p1, "1").await.expect("find_binding"),
        None
    );
    assert_eq!(token(&store, &p1, "1").await, None, "the token goes too");
    let newest = audit(&store, by_user(&user_id)).await.remove(0);
    assert_eq!(
        newest,
        AuditEvent {
            at: t1,
            kind: AuditKind::IdentityUnlinked,
            actor: Some("admin".into()),
            provider: Some(p1.clone()),
            subject: Some("1".into()),
            user_id: Some(user_id.clone()),
            reason: None,
            detail: None,
        }
    );

    // The last one needs force.
    let audit_before = newest_audit_id(&store).await;
    assert_eq!(
        conflict(store.unlink_identity(&user_id, &p2, false, None, t1).await),
        Conflict::LastIdentity
    );
    assert!(
        store
            .find_binding(&p2, "2")
            .await
            .expect("find_binding")
            .is_some()
    );
    assert_eq!(newest_audit_id(&store).await, audit_before);
    let user = store
        .unlink_identity(&user_id, &p2, true, None, t1)
        .await
        .expect("forced unlink");
    assert!(user.identities.is_empty());
    assert_eq!(
        get_user(&store, &user_id).await,
        Some(User {
            id: user_id.clone(),
            created_at: t0,
            identities: Vec::new(),
        }),
        "the user row stays"
    );
    assert_eq!(users(&store).await, users_before);
    assert_eq!(token(&store, &p2, "2").await, None);
    not_found(store.unlink_identity(&user_id, &p2, true, None, t1).await);

    // An identity-less user is still listed, and can be linked again.
    let listed = store
        .list_users(&UserQuery {
            created_after: Some(t0),
            created_before: Some(t0 + Duration::microseconds(1)),
            limit: 1000,
            ..UserQuery::default()
        })
        .await
        .expect("list_users");
    assert!(
        listed
            .iter()
            .any(|u| u.id == user_id && u.identities.is_empty())
    );
    link(&store, &user_id, &minimal_identity(&p3, "3"), None, t1)
        .await
        .expect("relink");

    // The unlinked identity is unbound: its next login is a first login.
    let (outcome, fresh) = bind(&store, &minimal_identity(&p1, "1"), None, t1).await;
    assert_eq!(outcome, Outcome::UserCreated);
    assert_ne!(fresh.user_id, user_id);

    // Two concurrent unlinks of a user's two identities: they cannot both
    // see "not the last one"; exactly one goes.
    for round in 0..4 {
        let (q1, q2) = (unique_provider("race-ul1"), unique_provider("race-ul2"));
        let (_, made) = bind(&store, &minimal_identity(&q1, "1"), None, t0).await;
        link(&store, &made.user_id, &minimal_identity(&q2, "2"), None, t0)
            .await
            .expect("link");
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = [q1, q2]
            .into_iter()
            .map(|provider| {
                let (store, barrier, user_id) = (
                    Arc::clone(&store),
                    Arc::clone(&barrier),
                    made.user_id.clone(),
                );
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .unlink_identity(&user_id, &provider, false, None, t1)
                        .await
                })
            })
            .collect();
        let mut unlinked = 0;
        for task in tasks {
            match task.await.expect("task") {
                Ok(user) => {
                    assert_eq!(user.identities.len(), 1);
                    unlinked += 1;
                }
                Err(e) => assert_eq!(conflict::<()>(Err(e)), Conflict::LastIdentity),
            }
        }
        assert_eq!(unlinked, 1, "round {round}");
        let user = get_user(&store, &made.user_id).await.expect("user");
        assert_eq!(user.identities.len(), 1, "round {round}");
    }
}

pub async fn delete_user_cascades_and_keeps_the_audit_trail(store: Arc<dyn Store>) {
    migrated(&store).await;
    let p1 = unique_provider("del1");
    let p2 = unique_provider("del2");
    let t0 = now_micros();
    let t1 = t0 + Duration::seconds(10);

    not_found(store.delete_user(&unique("nobody"), None, t1).await);

    let (_, made, _) = bound(
        login(
            &store,
            &minimal_identity(&p1, "1"),
            &create_policy(),
            Some(&sealed("one", t0)),
            t0,
        )
        .await,
    );
    let user_id = made.user_id.clone();
    link(
        &store,
        &user_id,
        &minimal_identity(&p2, "2"),
        Some(&sealed("two", t0)),
        t0,
    )
    .await
    .expect("link");
    // A bystander at the same provider is untouched.
    let (_, bystander, _) = bound(
        login(
            &store,
            &minimal_identity(&p1, "other"),
            &create_policy(),
            Some(&sealed("other", t0)),
            t0,
        )
        .await,
    );
    let bystander_before = get_user(&store, &bystander.user_id).await;
    let trail_before = audit(&store, by_user(&user_id)).await;
    let users_before = users(&store).await;

    store
        .delete_user(&user_id, Some("admin"), t1)
        .await
        .expect("delete_user");

    assert_eq!(users(&store).await, users_before - 1);
    assert_eq!(get_user(&store, &user_id).await, None);
    for (provider, subject) in [(&p1, "1"), (&p2, "2")] {
        assert_eq!(
            store
                .find_binding(provider, subject)
                .await
                .expect("find_binding"),
            None
        );
        assert_eq!(
            store
                .find_user_by_identity(provider, subject)
                .await
                .expect("find_user_by_identity"),
            None
        );
        assert_eq!(token(&store, provider, subject).await, None);
    }
    let remaining: Vec<TokenRow> = store
        .list_tokens(Some((p1.as_str(), "")), 1000)
        .await
        .expect("list_tokens")
        .into_iter()
        .filter(|row| row.provider == p1 || row.provider == p2)
        .collect();
    assert_eq!(
        remaining
            .iter()
            .map(|row| row.subject.as_str())
            .collect::<Vec<_>>(),
        vec!["other"]
    );
    assert_eq!(get_user(&store, &bystander.user_id).await, bystander_before);

    // The trail outlives the user, with the deletion on top.
    let trail = audit(&store, by_user(&user_id)).await;
    assert_eq!(trail.len(), trail_before.len() + 1);
    assert_eq!(&trail[1..], &trail_before[..]);
    assert_eq!(
        trail[0],
        AuditEvent {
            at: t1,
            kind: AuditKind::UserDeleted,
            actor: Some("admin".into()),
            provider: None,
            subject: None,
            user_id: Some(user_id.clone()),
            reason: None,
            detail: None,
        }
    );

    not_found(store.delete_user(&user_id, None, t1).await);
    // Its identities are free again: the next login makes a new user.
    let (outcome, fresh) = bind(&store, &minimal_identity(&p1, "1"), None, t1).await;
    assert_eq!(outcome, Outcome::UserCreated);
    assert_ne!(fresh.user_id, user_id);
}

pub async fn token_writes_compare_and_swap(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("cas");
    let t0 = now_micros();
    let at = |s: i64| t0 + Duration::seconds(s);
    let (one, two, three) = (
        sealed("one", at(1)),
        sealed("two", at(2)),
        sealed("three", at(3)),
    );

    // No such identity: nothing to write to.
    not_found(store.put_token(&provider, "1", &one, None).await);
    not_found(store.put_token(&provider, "1", &one, Some(1)).await);
    assert_eq!(token(&store, &provider, "1").await, None);
    assert!(
        !store
            .delete_token(&provider, "1")
            .await
            .expect("delete_token")
    );

    bind(&store, &minimal_identity(&provider, "1"), None, t0).await;
    let put = |token: &SealedToken, expected: Option<i64>| {
        let (store, provider, token) = (Arc::clone(&store), provider.clone(), token.clone());
        async move { store.put_token(&provider, "1", &token, expected).await }
    };

    // Unconditional writes start at 1 and count up.
    assert_eq!(put(&one, None).await.expect("put"), 1);
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&one, 1)));
    assert_eq!(put(&two, None).await.expect("put"), 2);
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&two, 2)));

    // A writer that read version 1 lost the race: nothing changes.
    assert_eq!(conflict(put(&three, Some(1)).await), Conflict::StaleToken);
    assert_eq!(
        conflict(put(&three, Some(3)).await),
        Conflict::StaleToken,
        "a version from the future is stale too"
    );
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&two, 2)));
    // The one that read version 2 wins.
    assert_eq!(put(&three, Some(2)).await.expect("put"), 3);
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&three, 3)));

    // Deleted: a compare-and-swap against what is gone is stale; an
    // unconditional write starts over.
    assert!(
        store
            .delete_token(&provider, "1")
            .await
            .expect("delete_token")
    );
    assert!(
        !store
            .delete_token(&provider, "1")
            .await
            .expect("delete_token")
    );
    assert_eq!(token(&store, &provider, "1").await, None);
    assert_eq!(conflict(put(&one, Some(3)).await), Conflict::StaleToken);
    assert_eq!(token(&store, &provider, "1").await, None);
    assert_eq!(put(&one, None).await.expect("put"), 1);
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&one, 1)));

    // Tokens of other identities are separate.
    bind(&store, &minimal_identity(&provider, "2"), None, t0).await;
    assert_eq!(
        store
            .put_token(&provider, "2", &two, None)
            .await
            .expect("put"),
        1
    );
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&one, 1)));
}

pub async fn concurrent_token_writes_one_wins(store: Arc<dyn Store>) {
    const WRITERS: usize = 8;
    migrated(&store).await;
    let provider = unique_provider("cas-race");
    let now = now_micros();
    bind(&store, &minimal_identity(&provider, "1"), None, now).await;
    store
        .put_token(&provider, "1", &sealed("start", now), None)
        .await
        .expect("put");

    // Every writer read version 1 and refreshed; exactly one may store.
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (store, provider, barrier) =
                (Arc::clone(&store), provider.clone(), Arc::clone(&barrier));
            let token = sealed(&format!("writer-{i}"), now);
            tokio::spawn(async move {
                barrier.wait().await;
                (
                    token.clone(),
                    store.put_token(&provider, "1", &token, Some(1)).await,
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            (token, Ok(version)) => {
                assert_eq!(version, 2);
                winners.push(token);
            }
            (_, Err(e)) => assert_eq!(conflict::<()>(Err(e)), Conflict::StaleToken),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins");
    assert_eq!(
        token(&store, &provider, "1").await,
        Some(stored(&winners[0], 2))
    );

    // Unconditional writes all land, one after another.
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (store, provider) = (Arc::clone(&store), provider.clone());
            let token = sealed(&format!("blind-{i}"), now);
            tokio::spawn(async move { store.put_token(&provider, "1", &token, None).await })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.expect("task").expect("put"));
    }
    versions.sort_unstable();
    assert_eq!(versions, (3..3 + WRITERS as i64).collect::<Vec<_>>());
}

pub async fn mark_token_unusable_compares_versions(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("unusable");
    let t0 = now_micros();
    let first = sealed("first", t0);
    let (_, made, _) = bound(
        login(
            &store,
            &minimal_identity(&provider, "1"),
            &create_policy(),
            Some(&first),
            t0,
        )
        .await,
    );

    // Not the version the caller read: someone refreshed meanwhile.
    assert_eq!(
        conflict(store.mark_token_unusable(&provider, "1", 2).await),
        Conflict::StaleToken
    );
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&first, 1)));

    store
        .mark_token_unusable(&provider, "1", 1)
        .await
        .expect("mark_token_unusable");
    // Only the flag changes: same bytes, same version, same time.
    let unusable = SealedToken {
        usable: false,
        ..stored(&first, 1)
    };
    assert_eq!(token(&store, &provider, "1").await, Some(unusable.clone()));
    store
        .mark_token_unusable(&provider, "1", 1)
        .await
        .expect("marking twice is harmless");
    assert_eq!(token(&store, &provider, "1").await, Some(unusable));
    let user = get_user(&store, &made.user_id).await.expect("user");
    assert_eq!(user.identities[0].token, Some(false));

    // A writer that refreshed from version 1 can still store its result,
    // which is usable.
    let second = sealed("second", t0 + Duration::seconds(1));
    assert_eq!(
        store
            .put_token(&provider, "1", &second, Some(1))
            .await
            .expect("put"),
        2
    );
    assert_eq!(
        token(&store, &provider, "1").await,
        Some(stored(&second, 2))
    );

    // Nothing to mark: an identity without a token, or no identity.
    bind(&store, &minimal_identity(&provider, "2"), None, t0).await;
    not_found(store.mark_token_unusable(&provider, "2", 1).await);
    not_found(store.mark_token_unusable(&provider, "3", 1).await);
}

pub async fn list_tokens_pages_in_key_order(store: Arc<dyn Store>) {
    migrated(&store).await;
    let provider = unique_provider("keys");
    let now = now_micros();
    let subjects: Vec<String> = (0..7).map(|i| format!("s{i}")).collect();
    // Written out of key order.
    for subject in subjects.iter().rev() {
        bind(&store, &minimal_identity(&provider, subject), None, now).await;
        store
            .put_token(&provider, subject, &sealed(subject, now), None)
            .await
            .expect("put");
    }
    store
        .put_token(&provider, "s3", &sealed("s3-again", now), None)
        .await
        .expect("put");
    // An identity without a token is not listed.
    bind(&store, &minimal_identity(&provider, "s35"), None, now).await;

    // From just before this provider, pages of three until another
    // provider's row (or the end) shows up.
    let mut seen: Vec<TokenRow> = Vec::new();
    let mut cursor = (provider.clone(), String::new());
    'pages: for _ in 0..10 {
        let page = store
            .list_tokens(Some((cursor.0.as_str(), cursor.1.as_str())), 3)
            .await
            .expect("list_tokens");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        cursor = (last.provider.clone(), last.subject.clone());
        for row in page {
            if row.provider != provider {
                break 'pages;
            }
            seen.push(row);
        }
    }
    let listed: Vec<&str> = seen.iter().map(|row| row.subject.as_str()).collect();
    assert_eq!(
        listed,
        subjects.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for row in &seen {
        let expected = if row.subject == "s3" {
            stored(&sealed("s3-again", now), 2)
        } else {
            stored(&sealed(&row.subject, now), 1)
        };
        assert_eq!(row.token, expected, "{}", row.subject);
    }

    // Limit 0 is the default page, which holds all seven.
    let page = store
        .list_tokens(Some((provider.as_str(), "")), 0)
        .await
        .expect("list_tokens");
    assert!(page.len() >= 7);
    assert_eq!(
        page[..7]
            .iter()
            .map(|row| row.subject.as_str())
            .collect::<Vec<_>>(),
        listed
    );
    // After the last key of the provider, none of its rows.
    let after_last = store
        .list_tokens(Some((provider.as_str(), "s6")), 100)
        .await
        .expect("list_tokens");
    assert!(after_last.iter().all(|row| row.provider != provider));
    // No cursor: from the very first key.
    let first = store.list_tokens(None, 1).await.expect("list_tokens");
    assert_eq!(first.len(), 1);
}
