//! `BindingStore`: logins and links as the store applies them. Which user a
//! login binds to is the given `Decide`'s (`login::binding::decide`, tested
//! on its own); here a
//! backend shows that it finds the facts that decision reads and applies
//! each decision atomically: a returning login refreshes, a new user is
//! made once, a link is audited with its rule, `LinkRequired` writes
//! nothing, and a retried login answers what it committed.

use super::*;

pub async fn first_login_creates_user(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let provider = unique_provider("first");
    let identity = full_identity(&provider, "1001");
    let before = users(&store).await;
    let now = now_micros();

    let (outcome, binding) = bind(&store, decide, &identity, Some("web"), now).await;

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

pub async fn returning_login_signs_in_and_refreshes_profile(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let provider = unique_provider("returning");
    let first = full_identity(&provider, "42");
    let t0 = now_micros();
    let (_, created) = bind(&store, decide, &first, None, t0).await;
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
    let (outcome, binding) = bind(&store, decide, &second, Some("web"), t1).await;

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
    let (outcome, _) = bind(&store, decide, &minimal, None, t2).await;
    assert_eq!(outcome, Outcome::SignedIn);
    let stored = store
        .find_identity(&provider, "42")
        .await
        .expect("find_identity");
    assert_eq!(stored.as_ref(), Some(&minimal));
    let (outcome, binding) = bind(&store, decide, &first, None, t2 + Duration::seconds(1)).await;
    assert_eq!(outcome, Outcome::SignedIn);
    assert_eq!(binding.user_id, created.user_id);
    let stored = store
        .find_identity(&provider, "42")
        .await
        .expect("find_identity");
    assert_eq!(stored.as_ref(), Some(&first));
}

pub async fn distinct_identities_get_distinct_users(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let github = unique_provider("github");
    let qq = unique_provider("qq");
    let before = users(&store).await;
    let now = now_micros();

    let (o1, a) = bind(&store, decide, &full_identity(&github, "7"), None, now).await;
    let (o2, b) = bind(&store, decide, &full_identity(&github, "8"), None, now).await;
    // Same subject at another provider is another person.
    let (o3, c) = bind(&store, decide, &full_identity(&qq, "7"), None, now).await;

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

pub async fn unknown_identity_is_absent(store: Arc<dyn Store>, decide: Decide) {
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
        decide,
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

/// A login whose commit's acknowledgement was lost is retried: the store
/// answers with what the first attempt committed (same outcome, same user)
/// and writes nothing more, whether the retry says so or not.
pub async fn a_retried_login_returns_what_it_committed(store: Arc<dyn Store>, decide: Decide) {
    store.migrate().await.expect("migrate");
    let provider = unique_provider("retried");
    let identity = minimal_identity(&provider, "retried");
    let users = store.count_users().await.expect("count");
    let id = format!("login-{}", uuid::Uuid::new_v4().simple());
    let first = store
        .bind_login(
            &identity,
            &create_policy(),
            decide,
            LoginRecord {
                tokens: None,
                actor: Some("web"),
                now: now_micros(),
                login: Some(LoginKey {
                    id: &id,
                    retry: false,
                }),
            },
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
                decide,
                LoginRecord {
                    tokens: None,
                    actor: Some("web"),
                    now: now_micros() + Duration::seconds(5),
                    login: Some(LoginKey { id: &id, retry }),
                },
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
            decide,
            LoginRecord {
                tokens: None,
                actor: Some("web"),
                now: now_micros(),
                login: Some(LoginKey {
                    id: &other,
                    retry: true,
                }),
            },
        )
        .await
        .expect("next login");
    let (outcome, next_binding, _) = bound(next);
    assert_eq!(outcome, Outcome::SignedIn);
    assert_eq!(next_binding.user_id, binding.user_id);
}

/// The facts a `Decide` reads, as a store must find them: for each linking
/// rule the oldest identity (by creation time) that matches at
/// the rule's providers — union ids exactly, verified emails ignoring case,
/// never an unverified one or one at a provider outside the rule — and
/// whether its user already has an identity at the login's provider. The
/// link it decides is applied as decided: the identity joins that user, with
/// `identity_linked` (naming the rule) and `login_succeeded`.
pub async fn linking_finds_the_oldest_candidate_of_each_rule(
    store: Arc<dyn Store>,
    decide: Decide,
) {
    migrated(&store).await;
    let t0 = now_micros();
    let t1 = t0 + Duration::seconds(1);

    // Union id. The older binding of the group is written last: "oldest" is
    // by time. An even older one outside the group is no candidate.
    let [a, b, c, outside] = ["ua", "ub", "uc", "uo"].map(unique_provider);
    let union_id = unique("union");
    let group = union_policy(&[&a, &b, &c], false);
    let t_oldest = t0 - Duration::seconds(20);
    bind(
        &store,
        decide,
        &with_union(&outside, "0", &union_id),
        None,
        t_oldest,
    )
    .await;
    bind(&store, decide, &with_union(&a, "1", &union_id), None, t0).await;
    let t_older = t0 - Duration::seconds(10);
    let (_, older) = bind(
        &store,
        decide,
        &with_union(&b, "2", &union_id),
        None,
        t_older,
    )
    .await;
    let before = users(&store).await;
    let second = Identity {
        display_name: Some("Via c".into()),
        ..with_union(&c, "3", &union_id)
    };
    let linked = Binding {
        user_id: older.user_id.clone(),
        provider: c.clone(),
        subject: "3".into(),
        created_at: t1,
        last_login_at: t1,
    };
    assert_eq!(
        login(&store, decide, &second, &group, None, t1).await,
        BindResult::Bound {
            outcome: Outcome::SignedIn,
            binding: linked.clone(),
            linked_by: Some("union_id"),
        }
    );
    assert_eq!(users(&store).await, before, "no user is created");
    assert_eq!(
        audit(&store, by_provider(&c)).await,
        vec![
            event(AuditKind::LoginSucceeded, &linked, Some("web"), t1),
            AuditEvent {
                detail: Some("union_id".into()),
                ..event(AuditKind::IdentityLinked, &linked, Some("web"), t1)
            },
        ]
    );
    assert_eq!(
        store.find_identity(&c, "3").await.expect("find_identity"),
        Some(second)
    );
    let older_user = get_user(&store, &older.user_id).await.expect("user");
    assert_eq!(older_user.identities.len(), 2, "b and c");
    // The oldest candidate's user has a `c` identity now: another `c`
    // identity is not linked, neither to them nor to the next candidate.
    assert_eq!(
        login(
            &store,
            decide,
            &with_union(&c, "4", &union_id),
            &group,
            None,
            t1
        )
        .await,
        BindResult::LinkRequired
    );

    // Verified email, spelt differently on each side. Older identities with
    // the address, one at an untrusted provider and one unverified, are no
    // candidates.
    let [untrusted, github, gitee] = ["em-untrusted", "em-github", "em-gitee"].map(unique_provider);
    let local = unique("ada");
    let address = format!("{local}@example.com");
    bind(
        &store,
        decide,
        &with_email(&untrusted, "x", &address, true),
        None,
        t_oldest,
    )
    .await;
    bind(
        &store,
        decide,
        &with_email(&github, "0", &address, false),
        None,
        t_older,
    )
    .await;
    let upper = format!("{}@Example.COM", local.to_uppercase());
    let (_, owner) = bind(
        &store,
        decide,
        &with_email(&github, "1", &upper, true),
        None,
        t0,
    )
    .await;
    let mixed = format!("A{}@eXample.com", &local[1..]);
    let (outcome, joined, linked_by) = bound(
        login(
            &store,
            decide,
            &with_email(&gitee, "77", &mixed, true),
            &email_policy(&[&github, &gitee], false),
            None,
            t1,
        )
        .await,
    );
    assert_eq!(
        (outcome, linked_by),
        (Outcome::SignedIn, Some("verified_email"))
    );
    assert_eq!(joined.user_id, owner.user_id);
}

pub async fn link_required_writes_nothing(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let web = unique_provider("lr-web");
    let app = unique_provider("lr-app");
    let union_id = unique("union");
    let email = format!("{}@example.com", unique("dave"));
    let t0 = now_micros();

    // A candidate for both rules, whose user already has an `app` identity.
    let (_, owner) = bind(
        &store,
        decide,
        &Identity {
            union_id: Some(union_id.clone()),
            ..with_email(&web, "w", &email, true)
        },
        None,
        t0,
    )
    .await;
    let (_, _) = bind(&store, decide, &minimal_identity(&app, "taken"), None, t0).await;
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
                .bind_login(
                    identity,
                    policy,
                    decide,
                    LoginRecord {
                        tokens: Some(&token),
                        actor: Some("web"),
                        now: t0,
                        login: None,
                    },
                )
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

pub async fn link_identity_creates_the_user_and_links(store: Arc<dyn Store>, decide: Decide) {
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
    let (outcome, signed_in) = bind(&store, decide, &minimal_identity(&p2, "2"), None, t2).await;
    assert_eq!(outcome, Outcome::SignedIn);
    assert_eq!(signed_in.user_id, app_user);

    // An existing user made by a login can be linked to as well.
    let (_, made) = bind(&store, decide, &minimal_identity(&p1, "9"), None, t0).await;
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

pub async fn link_identity_conflicts_write_nothing(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let p1 = unique_provider("lc1");
    let p2 = unique_provider("lc2");
    let t0 = now_micros();
    let (_, a) = bind(&store, decide, &minimal_identity(&p1, "1"), None, t0).await;
    let (_, b) = bind(&store, decide, &minimal_identity(&p2, "1"), None, t0).await;
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
