//! The database itself: migrations that keep data, a ping, and values that
//! come back exactly as written (text of any script, timestamps to the
//! microsecond).

use super::*;

pub async fn migrate_is_idempotent(store: Arc<dyn Store>, decide: Decide) {
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
            decide,
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

pub async fn ping_answers(store: Arc<dyn Store>, _: Decide) {
    store.ping().await.expect("ping before migrate");
    migrated(&store).await;
    store.ping().await.expect("ping after migrate");
}

pub async fn text_round_trips_exactly(store: Arc<dyn Store>, decide: Decide) {
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
                    decide,
                    LoginRecord {
                        tokens: Some(&token),
                        actor: Some(text),
                        now: now_micros(),
                        login: None,
                    },
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

pub async fn timestamps_round_trip_exactly(store: Arc<dyn Store>, decide: Decide) {
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
        let (_, created) = bind(&store, decide, &identity, None, moment).await;
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
        let (_, returning) = bind(&store, decide, &identity, None, later).await;
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
    let (_, created) = bind(&store, decide, &identity, None, precise).await;
    let found = store
        .find_binding(&provider, "nanos")
        .await
        .expect("find_binding")
        .expect("bound");
    assert_eq!(found, created);
    assert!((precise - found.created_at).abs() < Duration::microseconds(1));
}
