//! `UserDirectory`: users read with their identities, listed with filters
//! and pages, unlinked from an identity and deleted.

use super::*;

pub async fn users_are_read_with_their_identities(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    // Names whose order is the same under any collation.
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (pa, pb, pc) = (format!("ra{tag}"), format!("rb{tag}"), format!("rc{tag}"));
    let t0 = now_micros();
    let (tb, tc) = (t0 + Duration::seconds(1), t0 + Duration::seconds(2));

    // Made by a login at `c`, then given `a` and `b`, out of provider order.
    let c = full_identity(&pc, "3");
    let (_, made) = bind(&store, decide, &c, None, t0).await;
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
    bind(&store, decide, &c, None, later).await;

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

pub async fn list_users_filters_and_pages(store: Arc<dyn Store>, decide: Decide) {
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
            decide,
            &minimal_identity(&provider, &format!("s{i}")),
            None,
            at(s),
        )
        .await;
        made.push(binding.user_id);
    }
    // One user from elsewhere who also has an identity at `provider`, one
    // who has none.
    let (_, both) = bind(
        &store,
        decide,
        &minimal_identity(&other, "both"),
        None,
        at(25),
    )
    .await;
    link(
        &store,
        &both.user_id,
        &minimal_identity(&provider, "both"),
        None,
        at(26),
    )
    .await
    .expect("link");
    let (_, elsewhere) = bind(
        &store,
        decide,
        &minimal_identity(&other, "only"),
        None,
        at(35),
    )
    .await;

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

pub async fn unlink_identity_rules(store: Arc<dyn Store>, decide: Decide) {
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
            decide,
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
    let (outcome, fresh) = bind(&store, decide, &minimal_identity(&p1, "1"), None, t1).await;
    assert_eq!(outcome, Outcome::UserCreated);
    assert_ne!(fresh.user_id, user_id);

    // Two concurrent unlinks of a user's two identities: they cannot both
    // see "not the last one"; exactly one goes.
    for round in 0..4 {
        let (q1, q2) = (unique_provider("race-ul1"), unique_provider("race-ul2"));
        let (_, made) = bind(&store, decide, &minimal_identity(&q1, "1"), None, t0).await;
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

pub async fn delete_user_cascades_and_keeps_the_audit_trail(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let p1 = unique_provider("del1");
    let p2 = unique_provider("del2");
    let t0 = now_micros();
    let t1 = t0 + Duration::seconds(10);

    not_found(store.delete_user(&unique("nobody"), None, t1).await);

    let (_, made, _) = bound(
        login(
            &store,
            decide,
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
            decide,
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
    let (outcome, fresh) = bind(&store, decide, &minimal_identity(&p1, "1"), None, t1).await;
    assert_eq!(outcome, Outcome::UserCreated);
    assert_ne!(fresh.user_id, user_id);
}
