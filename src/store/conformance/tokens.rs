//! `TokenStore`: tokens written at login and replaced, compare-and-swap
//! writes, unusable marks and the key-ordered listing rotation walks.

use super::*;

pub async fn tokens_are_stored_on_login_and_replaced(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let provider = unique_provider("tokens");
    let t0 = now_micros();
    let first = sealed("first", t0);
    let (outcome, binding, _) = bound(
        login(
            &store,
            decide,
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
            decide,
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
            decide,
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
            decide,
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
            decide,
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
    bind(
        &store,
        decide,
        &with_union(&provider, "3", &union_id),
        None,
        t2,
    )
    .await;
    let linked_token = sealed("linked", t2);
    let (_, _, linked_by) = bound(
        login(
            &store,
            decide,
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

pub async fn token_writes_compare_and_swap(store: Arc<dyn Store>, decide: Decide) {
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

    bind(&store, decide, &minimal_identity(&provider, "1"), None, t0).await;
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
    bind(&store, decide, &minimal_identity(&provider, "2"), None, t0).await;
    assert_eq!(
        store
            .put_token(&provider, "2", &two, None)
            .await
            .expect("put"),
        1
    );
    assert_eq!(token(&store, &provider, "1").await, Some(stored(&one, 1)));
}

pub async fn mark_token_unusable_compares_versions(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let provider = unique_provider("unusable");
    let t0 = now_micros();
    let first = sealed("first", t0);
    let (_, made, _) = bound(
        login(
            &store,
            decide,
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
    bind(&store, decide, &minimal_identity(&provider, "2"), None, t0).await;
    not_found(store.mark_token_unusable(&provider, "2", 1).await);
    not_found(store.mark_token_unusable(&provider, "3", 1).await);
}

pub async fn list_tokens_pages_in_key_order(store: Arc<dyn Store>, decide: Decide) {
    migrated(&store).await;
    let provider = unique_provider("keys");
    let now = now_micros();
    let subjects: Vec<String> = (0..7).map(|i| format!("s{i}")).collect();
    // Written out of key order.
    for subject in subjects.iter().rev() {
        bind(
            &store,
            decide,
            &minimal_identity(&provider, subject),
            None,
            now,
        )
        .await;
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
    bind(
        &store,
        decide,
        &minimal_identity(&provider, "s35"),
        None,
        now,
    )
    .await;

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
