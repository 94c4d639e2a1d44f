//! The contract every `Store` implementation must honour, as scenarios that
//! panic on the first broken expectation.
//!
//! Each scenario migrates the store it is given and works under its own
//! randomly named provider, counting users as a difference from before it
//! ran, so scenarios pass on a fresh store and one after another on a shared
//! one (`run_all`). They must not run concurrently on one store: the user
//! counts would then include another scenario's users.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use time::{Duration, OffsetDateTime, UtcOffset};

use super::{AuditQuery, Store};
use crate::domain::{AuditEvent, AuditKind, Binding, Identity, Outcome, now_micros};

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
    logins_are_audited,
    audit_events_filter_order_and_limit,
    text_round_trips_exactly,
    timestamps_round_trip_exactly,
);

/// Runs every scenario, one after another, on one store.
pub async fn run_all(store: Arc<dyn Store>) {
    for (_, scenario) in SCENARIOS {
        scenario(Arc::clone(&store)).await;
    }
}

/// A provider name no other scenario (or earlier run on a shared store) uses.
fn unique_provider(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
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

async fn migrated(store: &Arc<dyn Store>) {
    store.migrate().await.expect("migrate");
}

async fn users(store: &Arc<dyn Store>) -> u64 {
    store.count_users().await.expect("count_users")
}

async fn bind(
    store: &Arc<dyn Store>,
    identity: &Identity,
    actor: Option<&str>,
    now: OffsetDateTime,
) -> (Outcome, Binding) {
    store
        .bind_login(identity, actor, now)
        .await
        .expect("bind_login")
}

async fn audit(store: &Arc<dyn Store>, query: AuditQuery) -> Vec<AuditEvent> {
    store
        .list_audit_events(&query)
        .await
        .expect("list_audit_events")
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
    let (outcome, _) = bind(
        &store,
        &minimal_identity(&provider, "1"),
        None,
        now_micros(),
    )
    .await;
    assert_eq!(outcome, Outcome::UserCreated);
    store.migrate().await.expect("third migrate");
    assert_eq!(users(&store).await, before + 1, "migrate must keep data");
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
        .map(|_| {
            let store = Arc::clone(&store);
            let identity = identity.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                store.bind_login(&identity, Some("web"), now).await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(LOGINS);
    for task in tasks {
        results.push(task.await.expect("task").expect("bind_login"));
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

    let events = audit(
        &store,
        AuditQuery {
            provider: Some(provider.clone()),
            user_id: None,
            limit: 1000,
        },
    )
    .await;
    let count = |kind| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count(AuditKind::UserCreated), 1);
    assert_eq!(count(AuditKind::LoginSucceeded), LOGINS);
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

    let expected = |kind, at| AuditEvent {
        at,
        kind,
        actor: Some("web".into()),
        provider: Some(provider.clone()),
        subject: Some("u1".into()),
        user_id: Some(binding.user_id.clone()),
        reason: None,
    };
    let by_user = AuditQuery {
        provider: None,
        user_id: Some(binding.user_id.clone()),
        limit: 10,
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
    };
    store.record_audit(&failed).await.expect("record_audit");
    let by_provider = audit(
        &store,
        AuditQuery {
            provider: Some(provider.clone()),
            user_id: None,
            limit: 1,
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

    // Written out of time order: reads must order by time, not insertion.
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
            (10, "login_succeeded"),
            (10, "user_created"),
            (5, "login_failed"),
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

    // Unfiltered reads see everything, newest first.
    let all = audit(&store, query(None, None, 2)).await;
    assert_eq!(all.len(), 2);
    assert!(all[0].at >= all[1].at);
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
        let (outcome, binding) = bind(&store, &identity, Some(text), now_micros()).await;
        assert_eq!(outcome, Outcome::UserCreated);
        assert_eq!(binding.subject, subject);

        let stored = store
            .find_identity(&provider, &subject)
            .await
            .expect("find_identity");
        assert_eq!(stored.as_ref(), Some(&identity), "text {text:?}");
        let found = store
            .find_binding(&provider, &subject)
            .await
            .expect("find_binding");
        assert_eq!(found.as_ref(), Some(&binding), "text {text:?}");

        let events = audit(
            &store,
            AuditQuery {
                provider: None,
                user_id: Some(binding.user_id.clone()),
                limit: 1,
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
    };
    store.record_audit(&failed).await.expect("record_audit");
    let events = audit(
        &store,
        AuditQuery {
            provider: Some(provider.clone()),
            user_id: None,
            limit: 1,
        },
    )
    .await;
    assert_eq!(events, vec![failed]);
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

        let event = AuditEvent {
            at: moment,
            kind: AuditKind::LoginFailed,
            actor: None,
            provider: Some(format!("{provider}-audit")),
            subject: Some(subject.clone()),
            user_id: None,
            reason: Some("STATE_UNKNOWN".into()),
        };
        store.record_audit(&event).await.expect("record_audit");
    }
    let events = audit(
        &store,
        AuditQuery {
            provider: Some(format!("{provider}-audit")),
            user_id: None,
            limit: 100,
        },
    )
    .await;
    let mut read: Vec<OffsetDateTime> = events.iter().map(|e| e.at).collect();
    let mut written: Vec<OffsetDateTime> = moments.to_vec();
    read.sort();
    written.sort();
    assert_eq!(read, written, "audit times round-trip");

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
