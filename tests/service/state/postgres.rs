//! The Postgres state backend beyond the shared contract: an unreachable
//! server, what a reader of its table sees, the sweep, and two replicas on
//! one database.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use authbroker::state::{
    Fingerprint, Kind, Pending, PostgresStateStore, StateError, StateLimits, StateStore,
    conformance,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use time::OffsetDateTime;

use crate::support::db::{self, TestDatabase};

/// Connections per store: enough for the 2,000 concurrent claims to queue
/// briefly rather than time out.
const POOL_SIZE: usize = 16;

/// A migrated store on `db` per call. Each test has a database of its own,
/// so every store a scenario asks for starts empty.
pub fn factory(db: &TestDatabase) -> conformance::Factory {
    let url = db.url.clone();
    Arc::new(move |limits| {
        let url = url.clone();
        Box::pin(async move { Arc::new(store(&url, limits).await) as Arc<dyn StateStore> })
    })
}

async fn store(url: &str, limits: StateLimits) -> PostgresStateStore {
    let store = PostgresStateStore::connect(url, POOL_SIZE, limits).expect("connect");
    // What readiness calls: migrates, then counts.
    store.prepare().await.expect("prepare");
    store
}

async fn sql(db: &TestDatabase) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect for inspection");
    tokio::spawn(connection);
    client
}

async fn rows(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM pending_states", &[])
        .await
        .expect("count rows")
        .get(0)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_server_is_unavailable_quickly() {
    let started = Instant::now();
    let store = PostgresStateStore::connect(
        "postgres://postgres@127.0.0.1:1/x",
        2,
        StateLimits::with_capacity(10),
    )
    .expect("connecting is lazy");
    tokio::time::timeout(
        Duration::from_secs(10),
        conformance::a_down_backend_is_unavailable(Arc::new(store)),
    )
    .await
    .expect("every operation answers within seconds");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(
        PostgresStateStore::connect(
            "postgres://u@h:notaport/db",
            2,
            StateLimits::with_capacity(1)
        ),
        Err(StateError::Unavailable(_))
    ));
}

/// Logins pending, claimed (with progress) and finished, and a ticket: no
/// row or column, as text or as raw bytes, holds the state, the PKCE
/// verifier, the nonce, `return_to`, the ticket or the progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_holds_no_secret() {
    let db = db::fresh_database().await;
    let store = store(&db.url, StateLimits::with_capacity(100)).await;

    // Each secret as text and, for the random ones, as its raw bytes.
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let mut login = || {
        let (token, pending) = conformance::login(time::Duration::minutes(10));
        let Pending::Login(l) = &pending else {
            unreachable!("conformance::login makes a login")
        };
        let pkce = l.pkce.expect("a verifier").verifier();
        let nonce = l.nonce.expect("a nonce").verifier();
        for text in [token.as_str(), pkce, nonce] {
            secrets.push(URL_SAFE_NO_PAD.decode(&text).expect("base64url"));
            secrets.push(text.into_bytes());
        }
        let return_to = l.return_to.as_deref().expect("return_to");
        secrets.push(return_to.as_bytes().to_vec());
        (token, pending)
    };
    let pending_login = login();
    let claimed_login = login();
    let finished_login = login();
    let ticket_payload = b"ticket: github/4242 access-token gho_s3cr3t".to_vec();
    let login_progress = b"progress: exchanged, id token eyJhbGciOi".to_vec();
    let ticket_progress = b"progress: linking to user 7f3c".to_vec();
    secrets.extend([
        ticket_payload.clone(),
        login_progress.clone(),
        ticket_progress.clone(),
    ]);
    let (ticket_token, ticket) = conformance::ticket(time::Duration::minutes(15), &ticket_payload);
    secrets.push(ticket_token.as_str().into_bytes());

    for (token, pending) in [&pending_login, &claimed_login, &finished_login] {
        store.put(token, pending.clone()).await.expect("put login");
    }
    store.put(&ticket_token, ticket).await.expect("put ticket");
    let code = Fingerprint::of(&["the-code"]);
    let claimed = store
        .claim(Kind::Login, &claimed_login.0, &code, now())
        .await
        .expect("claim");
    store
        .release(
            Kind::Login,
            &claimed_login.0,
            claimed.attempt,
            Some(login_progress),
        )
        .await
        .expect("release");
    let done = store
        .claim(Kind::Login, &finished_login.0, &code, now())
        .await
        .expect("claim");
    store
        .finish(Kind::Login, &finished_login.0, done.attempt)
        .await
        .expect("finish");
    let user = Fingerprint::of(&["user-1"]);
    let redeeming = store
        .claim(Kind::Ticket, &ticket_token, &user, now())
        .await
        .expect("claim ticket");
    store
        .release(
            Kind::Ticket,
            &ticket_token,
            redeeming.attempt,
            Some(ticket_progress),
        )
        .await
        .expect("release ticket");

    let client = sql(&db).await;
    assert_eq!(rows(&client).await, 4);
    let as_text: Vec<String> = client
        .query("SELECT t::text FROM pending_states t", &[])
        .await
        .expect("read rows as text")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let raw: Vec<Vec<u8>> = client
        .query(
            "SELECT key, fingerprint, sealed, progress FROM pending_states",
            &[],
        )
        .await
        .expect("read raw columns")
        .iter()
        .flat_map(|r| (0..4).filter_map(move |i| r.get::<_, Option<Vec<u8>>>(i)))
        .collect();
    // 4 keys; the fingerprints of the 2 claims still held (finishing clears
    // one); the 3 unfinished entries; the 2 releases' progress.
    assert_eq!(raw.len(), 4 + 2 + 3 + 2, "every stored column was read");
    for secret in &secrets {
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        for text in &as_text {
            assert!(
                !contains(text.as_bytes(), secret) && !text.contains(&hex),
                "a row's text shows a secret"
            );
        }
        for column in &raw {
            assert!(!contains(column, secret), "a column holds a secret");
        }
    }

    // And all of it still works for whoever holds the tokens.
    let retry = store
        .claim(Kind::Login, &claimed_login.0, &code, now())
        .await
        .expect("retry");
    assert!(
        retry
            .progress
            .is_some_and(|p| p.starts_with(b"progress: exchanged"))
    );
    store
        .claim(Kind::Login, &pending_login.0, &code, now())
        .await
        .expect("the pending login");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Rows past their deadline (expired, finished, claimed past the retry
/// window, of both kinds) leave the table within a sweep or two; live rows
/// stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_removes_what_is_past_its_deadline() {
    let db = db::fresh_database().await;
    let store = store(
        &db.url,
        StateLimits {
            grace: Duration::ZERO,
            retry_window: Duration::from_millis(300),
            ..StateLimits::with_capacity(10_000)
        },
    )
    .await;
    let short = time::Duration::milliseconds(300);
    let code = Fingerprint::of(&["code"]);
    for i in 0..600 {
        let (token, pending) = if i % 3 == 2 {
            conformance::ticket(short, b"t")
        } else {
            conformance::login(short)
        };
        let kind = pending.kind();
        store.put(&token, pending).await.expect("put");
        match i % 4 {
            0 => {}
            1 => {
                let c = store
                    .claim(kind, &token, &code, now())
                    .await
                    .expect("claim");
                store.finish(kind, &token, c.attempt).await.expect("finish");
            }
            2 => {
                store
                    .claim(kind, &token, &code, now())
                    .await
                    .expect("claim");
            }
            _ => store.cancel(kind, &token, now()).await.expect("cancel"),
        }
    }
    let mut live = Vec::new();
    for _ in 0..5 {
        let (token, pending) = conformance::login(time::Duration::minutes(10));
        store.put(&token, pending).await.expect("put");
        live.push(token);
    }
    // Nothing but the sweep deletes rows, and it may have begun already.
    let client = sql(&db).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows(&client).await > 5 {
        assert!(
            Instant::now() < deadline,
            "the sweep left rows past their deadline"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.held().await.expect("held"), 5);
    for token in &live {
        store
            .claim(Kind::Login, token, &code, now())
            .await
            .expect("a live login survives the sweep");
    }
}

/// Two replicas on one database: a login begun on one is completed on the
/// other and its replay refused on the first; a ticket crosses too; of
/// concurrent claims spread over both, one wins; and each learns the other's
/// logins for its capacity at its next count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_entries() {
    let db = db::fresh_database().await;
    let limits = StateLimits::with_capacity(4);
    let a = Arc::new(store(&db.url, limits).await);
    let b = Arc::new(store(&db.url, limits).await);
    let code = Fingerprint::of(&["code"]);

    let (token, pending) = conformance::login(time::Duration::minutes(10));
    a.put(&token, pending).await.expect("put on A");
    let claimed = b
        .claim(Kind::Login, &token, &code, now())
        .await
        .expect("claim on B");
    b.finish(Kind::Login, &token, claimed.attempt)
        .await
        .expect("finish on B");
    assert!(matches!(
        a.claim(Kind::Login, &token, &code, now()).await,
        Err(StateError::AlreadyUsed)
    ));

    let (ticket_token, ticket) = conformance::ticket(time::Duration::minutes(15), b"identity");
    a.put(&ticket_token, ticket).await.expect("ticket on A");
    let redeemed = b
        .claim(
            Kind::Ticket,
            &ticket_token,
            &Fingerprint::of(&["user"]),
            now(),
        )
        .await
        .expect("redeemed on B");
    assert!(
        matches!(redeemed.pending, Pending::Ticket { ref payload, .. } if &payload[..] == b"identity")
    );
    b.finish(Kind::Ticket, &ticket_token, redeemed.attempt)
        .await
        .expect("finish ticket");

    let (token, pending) = conformance::login(time::Duration::minutes(10));
    b.put(&token, pending).await.expect("put on B");
    let claims: Vec<_> = (0..200)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let fp = Fingerprint::of(&[&format!("code-{}", i % 3)]);
            tokio::spawn(async move { store.claim(Kind::Login, &token, &fp, now()).await })
        })
        .collect();
    let mut wins = 0;
    for claim in claims {
        match claim.await.expect("task") {
            Ok(_) => wins += 1,
            Err(StateError::AlreadyUsed | StateError::InProgress) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(wins, 1, "one claim wins across replicas");

    // One place is held (the claimed login). A fills three more; B learns
    // of them by its next count and refuses a fifth.
    for _ in 0..3 {
        let (token, pending) = conformance::login(time::Duration::minutes(10));
        a.put(&token, pending).await.expect("put on A");
    }
    assert_eq!(a.held().await.expect("held"), 4);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (token, pending) = conformance::login(time::Duration::minutes(10));
    assert!(matches!(
        b.put(&token, pending).await,
        Err(StateError::Full { capacity: 4 })
    ));
}
