//! The contract every `StateStore` must honour, as named scenarios that
//! panic on the first broken expectation. Each scenario asks the backend's
//! `Factory` for a store of its own with the limits it needs, so scenarios
//! never see each other's entries or counts.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use time::OffsetDateTime;

use super::{
    Claimed, Fingerprint, Kind, Pending, PendingLogin, StateError, StateLimits, StateStore,
    StateToken, login_secrets,
};

/// Makes a fresh, empty store of the backend under test with `limits`.
pub type Factory = Arc<
    dyn Fn(StateLimits) -> Pin<Box<dyn Future<Output = Arc<dyn StateStore>> + Send>> + Send + Sync,
>;

/// A scenario, boxed so the list below can name them all.
pub type Scenario = fn(Factory) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        /// Every scenario with its name; a backend's tests run each one (and
        /// check that they cover this whole list).
        pub const SCENARIOS: &[(&str, Scenario)] = &[
            $((stringify!($name), |factory| Box::pin($name(factory)))),*
        ];
    };
}

scenarios!(
    a_login_round_trips_with_everything_it_is_bound_to,
    a_finished_state_is_used,
    an_unknown_state_is_unknown,
    an_expired_state_is_expired_then_used,
    another_fingerprint_hears_already_used,
    a_held_claim_is_in_progress_and_a_released_one_resumes,
    a_stale_attempt_cannot_touch_a_newer_claim,
    a_lease_that_runs_out_lets_a_retry_take_over,
    the_retry_window_ends,
    cancellation,
    capacity_is_exact_and_freed_on_finish,
    link_tickets_are_their_own_kind,
    an_entry_is_reachable_only_under_its_owner,
    single_use_under_2000_concurrent_claims,
);

/// Runs every scenario, one after another.
pub async fn run_all(factory: Factory) {
    for (_, scenario) in SCENARIOS {
        scenario(factory.clone()).await;
    }
}

/// A backend that cannot be reached must say so, on every operation.
pub async fn a_down_backend_is_unavailable(store: Arc<dyn StateStore>) {
    let (token, pending) = login(time::Duration::minutes(10));
    let fp = fingerprint("code");
    let now = OffsetDateTime::now_utc();
    let unavailable = |what: &str, r: Result<(), StateError>| {
        assert!(
            matches!(r, Err(StateError::Unavailable(_))),
            "{what} on a down backend: {r:?}"
        );
    };
    unavailable("ping", store.ping().await);
    unavailable("put", store.put(&token, pending).await);
    unavailable(
        "claim",
        store.claim(Kind::Login, &token, &fp, now).await.map(drop),
    );
    unavailable("release", store.release(Kind::Login, &token, 1, None).await);
    unavailable("finish", store.finish(Kind::Login, &token, 1).await);
    unavailable("cancel", store.cancel(Kind::Login, &token, now).await);
    unavailable("held", store.held().await.map(drop));
}

fn limits() -> StateLimits {
    StateLimits::with_capacity(100)
}

pub fn login(ttl: time::Duration) -> (StateToken, Pending) {
    let (state, pkce, nonce) = login_secrets().expect("the OS RNG answers");
    let now = OffsetDateTime::now_utc();
    let login = PendingLogin {
        state,
        provider: "github".into(),
        redirect_uri: "https://app.example/oauth/callback".into(),
        scopes: Arc::from(vec!["read:user".to_string(), "user:email".to_string()]),
        return_to: Some("/orders?id=3".into()),
        pkce: Some(pkce),
        nonce: Some(nonce),
        created_at: now,
        expires_at: now + ttl,
    };
    (state, Pending::Login(login))
}

/// A link ticket with `payload`, expiring after `ttl`.
pub fn ticket(ttl: time::Duration, payload: &[u8]) -> (StateToken, Pending) {
    let token = StateToken::generate().expect("the OS RNG answers");
    let pending = Pending::Ticket {
        expires_at: OffsetDateTime::now_utc() + ttl,
        payload: Arc::from(payload),
    };
    (token, pending)
}

fn fingerprint(code: &str) -> Fingerprint {
    Fingerprint::of(&[code])
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

async fn claim(
    store: &dyn StateStore,
    token: &StateToken,
    code: &str,
) -> Result<Claimed, StateError> {
    store
        .claim(Kind::Login, token, &fingerprint(code), now())
        .await
}

fn expect_err(what: &str, r: Result<Claimed, StateError>, want: fn(&StateError) -> bool) {
    match r {
        Err(e) if want(&e) => {}
        Err(e) => panic!("{what}: unexpected error {e:?}"),
        Ok(c) => panic!("{what}: claimed (attempt {})", c.attempt),
    }
}

fn used(e: &StateError) -> bool {
    matches!(e, StateError::AlreadyUsed)
}

pub async fn a_login_round_trips_with_everything_it_is_bound_to(factory: Factory) {
    let store = factory(limits()).await;
    let (token, pending) = login(time::Duration::minutes(10));
    let Pending::Login(want) = pending.clone() else {
        unreachable!()
    };
    store.put(&token, pending).await.expect("put");
    let claimed = claim(&*store, &token, "code").await.expect("claim");
    assert_eq!(claimed.attempt, 1);
    assert!(claimed.progress.is_none());
    let Pending::Login(got) = claimed.pending else {
        panic!("a login came back as a ticket")
    };
    assert_eq!(got.state, token);
    assert_eq!(got.provider, want.provider);
    assert_eq!(got.redirect_uri, want.redirect_uri);
    assert_eq!(got.scopes, want.scopes);
    assert_eq!(got.return_to, want.return_to);
    assert_eq!(got.pkce, want.pkce, "the PKCE verifier");
    assert_eq!(got.nonce, want.nonce, "the nonce");
    // Backends may keep microseconds only.
    let micros = |t: OffsetDateTime| t.unix_timestamp_nanos() / 1_000;
    assert_eq!(micros(got.expires_at), micros(want.expires_at));
    assert_eq!(micros(got.created_at), micros(want.created_at));
}

pub async fn a_finished_state_is_used(factory: Factory) {
    let store = factory(limits()).await;
    let (token, pending) = login(time::Duration::minutes(10));
    store.put(&token, pending).await.expect("put");
    let claimed = claim(&*store, &token, "code").await.expect("claim");
    store
        .finish(Kind::Login, &token, claimed.attempt)
        .await
        .expect("finish");
    expect_err(
        "a replay with the same code",
        claim(&*store, &token, "code").await,
        used,
    );
    expect_err(
        "a replay with another code",
        claim(&*store, &token, "other").await,
        used,
    );
}

pub async fn an_unknown_state_is_unknown(factory: Factory) {
    let store = factory(limits()).await;
    let token = StateToken::generate().expect("rng");
    expect_err("never issued", claim(&*store, &token, "code").await, |e| {
        matches!(e, StateError::Unknown)
    });
    assert!(matches!(
        store.cancel(Kind::Login, &token, now()).await,
        Err(StateError::Unknown)
    ));
    // Release and finish of what is not there change nothing.
    store
        .release(Kind::Login, &token, 1, Some(b"x".to_vec()))
        .await
        .expect("release");
    store.finish(Kind::Login, &token, 1).await.expect("finish");
    expect_err("still unknown", claim(&*store, &token, "code").await, |e| {
        matches!(e, StateError::Unknown)
    });
}

pub async fn an_expired_state_is_expired_then_used(factory: Factory) {
    let store = factory(limits()).await;
    let (token, pending) = login(time::Duration::minutes(1));
    store.put(&token, pending).await.expect("put");
    let later = now() + time::Duration::minutes(2);
    let fp = fingerprint("code");
    expect_err(
        "after its expiry",
        store.claim(Kind::Login, &token, &fp, later).await,
        |e| matches!(e, StateError::Expired),
    );
    // The expired attempt finished it.
    expect_err(
        "again",
        store.claim(Kind::Login, &token, &fp, later).await,
        used,
    );
    expect_err("and now", claim(&*store, &token, "code").await, used);
    assert_eq!(store.held().await.expect("held"), 0, "its place is free");
}

pub async fn another_fingerprint_hears_already_used(factory: Factory) {
    let store = factory(limits()).await;
    let (token, pending) = login(time::Duration::minutes(10));
    store.put(&token, pending).await.expect("put");
    let claimed = claim(&*store, &token, "code").await.expect("claim");
    expect_err(
        "another code while the first attempt runs",
        claim(&*store, &token, "other").await,
        used,
    );
    store
        .release(Kind::Login, &token, claimed.attempt, None)
        .await
        .expect("release");
    expect_err(
        "another code after a retryable failure",
        claim(&*store, &token, "other").await,
        used,
    );
}

pub async fn a_held_claim_is_in_progress_and_a_released_one_resumes(factory: Factory) {
    let store = factory(limits()).await;
    let (token, pending) = login(time::Duration::minutes(10));
    store.put(&token, pending).await.expect("put");
    let first = claim(&*store, &token, "code").await.expect("claim");
    expect_err(
        "the same code while the lease is held",
        claim(&*store, &token, "code").await,
        |e| matches!(e, StateError::InProgress),
    );
    store
        .release(
            Kind::Login,
            &token,
            first.attempt,
            Some(b"exchanged".to_vec()),
        )
        .await
        .expect("release");
    let second = claim(&*store, &token, "code").await.expect("retry");
    assert_eq!(second.attempt, 2);
    assert_eq!(second.progress.as_deref(), Some(&b"exchanged"[..]));
    assert!(matches!(second.pending, Pending::Login(ref l) if l.state == token));
    // A retry that records nothing new keeps nothing: progress is what the
    // latest release said.
    store
        .release(Kind::Login, &token, second.attempt, None)
        .await
        .expect("release");
    let third = claim(&*store, &token, "code").await.expect("retry");
    assert_eq!(third.attempt, 3);
    assert!(third.progress.is_none());
    store
        .finish(Kind::Login, &token, third.attempt)
        .await
        .expect("finish");
    expect_err(
        "after the retry",
        claim(&*store, &token, "code").await,
        used,
    );
}

pub async fn a_stale_attempt_cannot_touch_a_newer_claim(factory: Factory) {
    let store = factory(limits()).await;
    let (token, pending) = login(time::Duration::minutes(10));
    store.put(&token, pending).await.expect("put");
    let first = claim(&*store, &token, "code").await.expect("claim");
    store
        .release(Kind::Login, &token, first.attempt, Some(b"one".to_vec()))
        .await
        .expect("release");
    let second = claim(&*store, &token, "code").await.expect("retry");
    // The first attempt, late, tries to finish and to release: neither
    // may disturb the second.
    store
        .finish(Kind::Login, &token, first.attempt)
        .await
        .expect("stale finish");
    store
        .release(Kind::Login, &token, first.attempt, Some(b"stale".to_vec()))
        .await
        .expect("stale release");
    expect_err(
        "the second attempt still holds the lease",
        claim(&*store, &token, "code").await,
        |e| matches!(e, StateError::InProgress),
    );
    store
        .release(Kind::Login, &token, second.attempt, Some(b"two".to_vec()))
        .await
        .expect("release");
    let third = claim(&*store, &token, "code").await.expect("retry");
    assert_eq!(third.attempt, 3);
    assert_eq!(third.progress.as_deref(), Some(&b"two"[..]));
}

pub async fn a_lease_that_runs_out_lets_a_retry_take_over(factory: Factory) {
    let store = factory(StateLimits {
        lease: Duration::from_millis(300),
        ..limits()
    })
    .await;
    let (token, pending) = login(time::Duration::minutes(10));
    store.put(&token, pending).await.expect("put");
    let first = claim(&*store, &token, "code").await.expect("claim");
    expect_err(
        "within the lease",
        claim(&*store, &token, "code").await,
        |e| matches!(e, StateError::InProgress),
    );
    // The first attempt died without releasing.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let second = claim(&*store, &token, "code")
        .await
        .expect("after the lease");
    assert_eq!(second.attempt, first.attempt + 1);
    assert!(second.progress.is_none(), "the dead attempt left nothing");
}

pub async fn the_retry_window_ends(factory: Factory) {
    let store = factory(StateLimits {
        grace: Duration::ZERO,
        // Well clear of the memory backend's 100 ms deadline margin.
        retry_window: Duration::from_millis(1_000),
        ..limits()
    })
    .await;
    // Expires before the retry window ends, so only the window keeps it.
    let (token, pending) = login(time::Duration::milliseconds(300));
    store.put(&token, pending).await.expect("put");
    let first = claim(&*store, &token, "code").await.expect("claim");
    store
        .release(Kind::Login, &token, first.attempt, None)
        .await
        .expect("release");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = claim(&*store, &token, "code")
        .await
        .expect("a retry after the state's expiry, within the window");
    store
        .release(Kind::Login, &token, second.attempt, None)
        .await
        .expect("release");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    match claim(&*store, &token, "code").await {
        Err(StateError::AlreadyUsed | StateError::Unknown) => {}
        other => panic!("a retry after the window: {other:?}"),
    }
    assert_eq!(store.held().await.expect("held"), 0, "its place is free");
}

pub async fn cancellation(factory: Factory) {
    let store = factory(limits()).await;
    let (token, pending) = login(time::Duration::minutes(10));
    store.put(&token, pending).await.expect("put");
    store
        .cancel(Kind::Login, &token, now())
        .await
        .expect("cancel a pending login");
    expect_err("after cancel", claim(&*store, &token, "code").await, used);
    assert!(matches!(
        store.cancel(Kind::Login, &token, now()).await,
        Err(StateError::AlreadyUsed)
    ));

    // A claimed login can be cancelled too; the attempt's finish is then
    // a no-op and a retry hears "already used".
    let (token, pending) = login(time::Duration::minutes(10));
    store.put(&token, pending).await.expect("put");
    let claimed = claim(&*store, &token, "code").await.expect("claim");
    store
        .cancel(Kind::Login, &token, now())
        .await
        .expect("cancel a claimed login");
    store
        .release(Kind::Login, &token, claimed.attempt, None)
        .await
        .expect("release after cancel");
    expect_err("a retry", claim(&*store, &token, "code").await, used);

    // An expired one is reported, and finished all the same.
    let (token, pending) = login(time::Duration::minutes(1));
    store.put(&token, pending).await.expect("put");
    let later = now() + time::Duration::minutes(2);
    assert!(matches!(
        store.cancel(Kind::Login, &token, later).await,
        Err(StateError::Expired)
    ));
    expect_err("after cancel", claim(&*store, &token, "code").await, used);
    assert_eq!(store.held().await.expect("held"), 0);
}

pub async fn capacity_is_exact_and_freed_on_finish(factory: Factory) {
    const CAPACITY: u64 = 5;
    let store = factory(StateLimits::with_capacity(CAPACITY)).await;
    let mut tokens = Vec::new();
    for _ in 0..CAPACITY {
        let (token, pending) = login(time::Duration::minutes(10));
        store
            .put(&token, pending)
            .await
            .expect("put below capacity");
        tokens.push(token);
    }
    let full = |r: Result<(), StateError>| {
        assert!(
            matches!(r, Err(StateError::Full { capacity: CAPACITY })),
            "put beyond capacity: {r:?}"
        );
    };
    let (extra, pending) = login(time::Duration::minutes(10));
    full(store.put(&extra, pending.clone()).await);
    assert_eq!(store.held().await.expect("held"), CAPACITY);

    // A claimed login still holds its place; a finished one gives it back.
    let claimed = claim(&*store, &tokens[0], "code").await.expect("claim");
    full(store.put(&extra, pending.clone()).await);
    store
        .finish(Kind::Login, &tokens[0], claimed.attempt)
        .await
        .expect("finish");
    store.put(&extra, pending).await.expect("the freed place");

    // So does a cancelled one, and one whose claim found it expired.
    store
        .cancel(Kind::Login, &tokens[1], now())
        .await
        .expect("cancel");
    let (again, pending) = login(time::Duration::minutes(10));
    store
        .put(&again, pending)
        .await
        .expect("the cancelled place");
    let (late, pending) = login(time::Duration::minutes(10));
    full(store.put(&late, pending.clone()).await);
    let fp = fingerprint("code");
    let after = now() + time::Duration::minutes(11);
    assert!(matches!(
        store.claim(Kind::Login, &tokens[2], &fp, after).await,
        Err(StateError::Expired)
    ));
    store.put(&late, pending).await.expect("the expired place");
    assert_eq!(store.held().await.expect("held"), CAPACITY);

    // Replays of the finished states are still caught.
    expect_err("replay", claim(&*store, &tokens[0], "code").await, used);
}

pub async fn link_tickets_are_their_own_kind(factory: Factory) {
    let store = factory(limits()).await;
    let (token, pending) = ticket(time::Duration::minutes(15), b"identity and tokens");
    store.put(&token, pending).await.expect("put");
    let fp = fingerprint("user-1");
    // A ticket is no state, and the other way round.
    assert!(matches!(
        store.claim(Kind::Login, &token, &fp, now()).await,
        Err(StateError::Unknown)
    ));
    let claimed = store
        .claim(Kind::Ticket, &token, &fp, now())
        .await
        .expect("claim the ticket");
    match &claimed.pending {
        Pending::Ticket { payload, .. } => assert_eq!(&payload[..], b"identity and tokens"),
        Pending::Login(_) => panic!("a ticket came back as a login"),
    }
    expect_err(
        "another user id",
        store
            .claim(Kind::Ticket, &token, &fingerprint("user-2"), now())
            .await,
        used,
    );
    store
        .finish(Kind::Ticket, &token, claimed.attempt)
        .await
        .expect("finish");
    expect_err(
        "a redeemed ticket",
        store.claim(Kind::Ticket, &token, &fp, now()).await,
        used,
    );

    let (state, pending) = login(time::Duration::minutes(10));
    store.put(&state, pending).await.expect("put");
    assert!(matches!(
        store.claim(Kind::Ticket, &state, &fp, now()).await,
        Err(StateError::Unknown)
    ));
    claim(&*store, &state, "code")
        .await
        .expect("the state is untouched by the ticket claim");
}

/// The login layer stores an API key's logins and tickets under
/// `StateToken::owned_by(key)`. Under another key's (or no key's) the entry
/// is unknown, and neither a claim nor a cancel there touches it: its owner
/// then claims it as a first attempt.
pub async fn an_entry_is_reachable_only_under_its_owner(factory: Factory) {
    let store = factory(limits()).await;
    let unknown = |e: &StateError| matches!(e, StateError::Unknown);
    for kind in [Kind::Login, Kind::Ticket] {
        let (state, pending) = match kind {
            Kind::Login => login(time::Duration::minutes(10)),
            Kind::Ticket => ticket(time::Duration::minutes(10), b"identity"),
        };
        let web = state.owned_by(Some("web"));
        store.put(&web, pending).await.expect("put");
        for other in [
            state.owned_by(Some("shop")),
            state.owned_by(Some("ops")),
            state.owned_by(None),
        ] {
            for code in ["code", "other"] {
                expect_err(
                    "a claim under another owner",
                    store.claim(kind, &other, &fingerprint(code), now()).await,
                    unknown,
                );
            }
            assert!(
                matches!(
                    store.cancel(kind, &other, now()).await,
                    Err(StateError::Unknown)
                ),
                "a cancel under another owner"
            );
        }
        let claimed = store
            .claim(kind, &web, &fingerprint("code"), now())
            .await
            .expect("the owner claims it");
        assert_eq!(claimed.attempt, 1);
        assert!(claimed.progress.is_none());
        match claimed.pending {
            Pending::Login(l) => assert_eq!(&*l.provider, "github"),
            Pending::Ticket { payload, .. } => assert_eq!(&*payload, b"identity"),
        }
        store.finish(kind, &web, 1).await.expect("finish");
    }
}

pub async fn single_use_under_2000_concurrent_claims(factory: Factory) {
    const CLAIMS: usize = 2_000;
    let store = factory(limits()).await;
    let (token, pending) = login(time::Duration::minutes(10));
    store.put(&token, pending).await.expect("put");
    let tasks: Vec<_> = (0..CLAIMS)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                // Half replay the winner's code, half bring their own.
                let code = if i % 2 == 0 {
                    "code".to_string()
                } else {
                    format!("code-{i}")
                };
                store
                    .claim(Kind::Login, &token, &fingerprint(&code), now())
                    .await
            })
        })
        .collect();
    let (mut wins, mut refused) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => wins += 1,
            Err(StateError::AlreadyUsed | StateError::InProgress) => refused += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(wins, 1, "exactly one claim wins");
    assert_eq!(refused, CLAIMS - 1);
}
