//! `AuditLog`: what logins record, and reading the trail back filtered,
//! newest first and paged.

use super::*;

pub async fn logins_are_audited(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let provider = unique_provider("audited");
    let t0 = now_micros();
    let (_, binding) = bind(
        &store,
        decide,
        &full_identity(&provider, "u1"),
        Some("web"),
        t0,
    )
    .await;

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
    bind(&store, decide, &full_identity(&provider, "u1"), None, t1).await;
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

pub async fn audit_events_filter_order_and_limit(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let github = unique_provider("gh");
    let qq = unique_provider("qq");
    let base = now_micros();
    let at = |s: i64| base + Duration::seconds(s);

    // Written out of time order: reads follow the order of writing (the id,
    // which is also the paging cursor), not the time.
    let (_, alice) = bind(
        &store,
        decide,
        &minimal_identity(&github, "alice"),
        None,
        at(10),
    )
    .await;
    let (_, bob) = bind(&store, decide, &minimal_identity(&qq, "bob"), None, at(20)).await;
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
    bind(
        &store,
        decide,
        &minimal_identity(&github, "alice"),
        None,
        at(30),
    )
    .await;

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

pub async fn audit_events_filter_by_kind_and_time_and_page_by_id(store: Arc<dyn Store>, _: Decide) {
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
