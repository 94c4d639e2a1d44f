//! Writes that race: concurrent first logins of one identity make one user
//! (or link it once), concurrent links bind once, and of concurrent token
//! writes from one version exactly one wins. Each scenario starts its
//! writers together behind a barrier.

use super::*;

/// 20, then 200 first logins of one identity at once: more than any pool
/// has connections, so most of them queue and lose the race to bind.
pub async fn concurrent_first_logins_create_one_user(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    for logins in [20, 200] {
        first_logins_race(&store, decide, logins).await;
    }
}

async fn first_logins_race(store: &Arc<dyn Store>, decide: Decide, logins: usize) {
    let provider = unique_provider("race");
    let identity = full_identity(&provider, "race-1");
    let before = users(store).await;
    let now = now_micros();

    // The barrier releases every task at once so their transactions overlap.
    let barrier = Arc::new(tokio::sync::Barrier::new(logins));
    let tasks: Vec<_> = (0..logins)
        .map(|i| {
            let store = Arc::clone(store);
            let identity = identity.clone();
            let barrier = Arc::clone(&barrier);
            let token = sealed(&format!("race-{i}"), now);
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .bind_login(
                        &identity,
                        &create_policy(),
                        decide,
                        LoginRecord {
                            tokens: Some(&token),
                            actor: Some("web"),
                            now,
                            login: None,
                        },
                    )
                    .await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(logins);
    for task in tasks {
        let (outcome, binding, linked_by) = bound(task.await.expect("task").expect("bind_login"));
        assert_eq!(linked_by, None);
        results.push((outcome, binding));
    }

    assert_eq!(
        users(store).await,
        before + 1,
        "exactly one user of {logins}"
    );
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
    let token = token(store, &provider, "race-1").await.expect("token");
    assert_eq!(token.version, logins as i64);
    assert!(token.usable);

    let events = audit(store, by_provider(&provider)).await;
    let count = |kind| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count(AuditKind::UserCreated), 1);
    assert_eq!(count(AuditKind::LoginSucceeded), logins);
    assert_eq!(events.len(), logins + 1, "nothing else is audited");
    assert!(
        events.iter().all(|e| e.user_id.as_ref() == Some(user_id)),
        "audit events must name the one user"
    );
}

pub async fn concurrent_first_logins_link_once(store: Arc<dyn Store>, decide: Decide) {
    const LOGINS: usize = 10;
    migrated(&store).await;
    let web = unique_provider("cl-web");
    let app = unique_provider("cl-app");
    let union_id = unique("union");
    let group = union_policy(&[&web, &app], true);
    let t0 = now_micros();
    let (_, owner) = bind(&store, decide, &with_union(&web, "w", &union_id), None, t0).await;
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
                    .bind_login(&identity, &group, decide, LoginRecord::at(t0))
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
    let (_, owner) = bind(&store, decide, &with_union(&web, "w2", &union_id), None, t0).await;
    let before = users(&store).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(LOGINS));
    let tasks: Vec<_> = (0..LOGINS)
        .map(|i| {
            let identity = with_union(&app, &format!("slot-{i}"), &union_id);
            let (store, group, barrier) = (Arc::clone(&store), group.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .bind_login(&identity, &group, decide, LoginRecord::at(t0))
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

pub async fn concurrent_links_of_one_identity_bind_once(store: Arc<dyn Store>, decide: Decide) {
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
                let (_, made) = bind(
                    &store,
                    decide,
                    &minimal_identity(&home, &i.to_string()),
                    None,
                    now,
                )
                .await;
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

pub async fn concurrent_token_writes_one_wins(store: Arc<dyn Store>, decide: Decide) {
    const WRITERS: usize = 8;
    migrated(&store).await;
    let provider = unique_provider("cas-race");
    let now = now_micros();
    bind(&store, decide, &minimal_identity(&provider, "1"), None, now).await;
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
