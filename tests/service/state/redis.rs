//! The Redis backend against a real server: `TEST_REDIS_URL`, else the
//! conventional local one (`redis://127.0.0.1:6379`). Without one the tests
//! say so loudly and pass, except in CI (`CI` set), where they fail and say
//! how to provide one. Every store gets a random key prefix of its own, so
//! tests never see each other's keys, and every key they leave expires.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use authbroker::state::{
    Fingerprint, Kind, Pending, RedisStateStore, StateError, StateLimits, StateStore, StateToken,
    conformance,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use time::OffsetDateTime;
use tokio::{net::TcpListener, sync::OnceCell};

const LOCAL_URL: &str = "redis://127.0.0.1:6379";

const HOW_TO_PROVIDE: &str = "no Redis server for the tests. Start one on 127.0.0.1:6379 \
     (`redis-server --daemonize yes`, or `apt-get install redis-server`), or set \
     TEST_REDIS_URL to a server the tests may write to (they use random key prefixes \
     and every key they write expires)";

/// The server's URL if it answers, found once per test binary.
static SERVER: OnceCell<Option<String>> = OnceCell::const_new();

async fn server() -> Option<String> {
    SERVER
        .get_or_init(|| async {
            let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| LOCAL_URL.to_string());
            let limits = StateLimits::with_capacity(1);
            match RedisStateStore::connect(&url, &prefix(), limits).await {
                Ok(_) => Some(url),
                Err(e) if std::env::var_os("CI").is_some() => {
                    panic!("{HOW_TO_PROVIDE} ({}: {e:?})", redacted(&url))
                }
                Err(e) => {
                    eprintln!(
                        "SKIPPED: the Redis state store tests: {HOW_TO_PROVIDE} ({}: {e:?})",
                        redacted(&url)
                    );
                    None
                }
            }
        })
        .await
        .clone()
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "an unparseable TEST_REDIS_URL".to_string(),
    }
}

fn prefix() -> String {
    format!("authbroker-test:{}:", uuid::Uuid::new_v4().simple())
}

/// Each call makes an empty store of its own under a fresh prefix; `None`
/// (after saying why) when there is no Redis and this is not CI.
pub async fn factory() -> Option<conformance::Factory> {
    let url = server().await?;
    Some(Arc::new(move |limits| {
        let url = url.clone();
        Box::pin(async move {
            let store = RedisStateStore::connect(&url, &prefix(), limits)
                .await
                .unwrap_or_else(|e| panic!("connecting to the test Redis: {e:?}"));
            Arc::new(store) as Arc<dyn StateStore>
        })
    }))
}

#[tokio::test]
async fn a_down_redis_is_unavailable_everywhere_and_says_so_quickly() {
    let limits = StateLimits::with_capacity(10);
    let started = Instant::now();
    assert!(matches!(
        RedisStateStore::connect("redis://127.0.0.1:1", &prefix(), limits).await,
        Err(StateError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "connect took {:?}",
        started.elapsed()
    );

    let store = RedisStateStore::lazy("redis://127.0.0.1:1", &prefix(), limits)
        .expect("a valid URL needs no server");
    let started = Instant::now();
    conformance::a_down_backend_is_unavailable(Arc::new(store)).await;
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "seven calls took {:?}",
        started.elapsed()
    );
}

/// A server that accepts connections and never answers: no call may hang.
#[tokio::test]
async fn a_silent_redis_is_unavailable_within_the_bound() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let store = RedisStateStore::lazy(
        &format!("redis://{addr}"),
        &prefix(),
        StateLimits::with_capacity(10),
    )
    .expect("a valid URL");
    let (token, pending) = conformance::login(time::Duration::minutes(10));
    let bounded = |what: &str, started: Instant, r: Result<(), StateError>| {
        assert!(
            matches!(r, Err(StateError::Unavailable(_))),
            "{what}: {r:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(2_500),
            "{what} took {:?}",
            started.elapsed()
        );
    };
    let started = Instant::now();
    bounded("ping", started, store.ping().await);
    let started = Instant::now();
    bounded("put", started, store.put(&token, pending).await);
    let started = Instant::now();
    let fp = Fingerprint::of(&["code"]);
    let claim = store
        .claim(Kind::Login, &token, &fp, OffsetDateTime::now_utc())
        .await;
    bounded("claim", started, claim.map(drop));
    held.abort();
}

/// A Redis that restarts (losing its scripts and data) is used again with no
/// help: the connection comes back on its own and the scripts are reloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_survives_a_redis_restart() {
    let Some(mut server) = OwnRedis::start() else {
        return;
    };
    let store = RedisStateStore::lazy(&server.url(), &prefix(), StateLimits::with_capacity(10))
        .expect("a valid URL");
    eventually("the first server", || store.ping()).await;
    let (token, pending) = conformance::login(time::Duration::minutes(10));
    store.put(&token, pending).await.expect("put");

    server.stop();
    assert!(matches!(
        store.ping().await,
        Err(StateError::Unavailable(_))
    ));
    server.restart();
    eventually("the restarted server", || store.ping()).await;
    // Its data went with it (no persistence), and so did the scripts.
    let fp = Fingerprint::of(&["code"]);
    let now = OffsetDateTime::now_utc();
    assert!(matches!(
        store.claim(Kind::Login, &token, &fp, now).await,
        Err(StateError::Unknown)
    ));
    let (token, pending) = conformance::login(time::Duration::minutes(10));
    store
        .put(&token, pending)
        .await
        .expect("put after the restart");
    store
        .claim(Kind::Login, &token, &fp, now)
        .await
        .expect("claim after the restart");
}

async fn eventually<F: Future<Output = Result<(), StateError>>>(
    what: &str,
    mut call: impl FnMut() -> F,
) {
    let started = Instant::now();
    while let Err(e) = call().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what} never answered: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `redis-server` of this test's own on a free port, without persistence,
/// killed when dropped.
struct OwnRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    /// `None` (after saying so) when `redis-server` is not installed.
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = OwnRedis { port, child: None };
        server.restart();
        server.child.is_some().then_some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let spawned = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => self.child = Some(child),
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("starting redis-server for the restart test: {e} ({HOW_TO_PROVIDE})")
            }
            Err(e) => eprintln!("SKIPPED: the Redis restart test: no redis-server ({e})"),
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two replicas on one server and prefix share the entries and one bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_entries_and_capacity() {
    let Some(url) = server().await else { return };
    let (prefix, limits) = (prefix(), StateLimits::with_capacity(3));
    let a = RedisStateStore::connect(&url, &prefix, limits)
        .await
        .expect("a");
    let b = RedisStateStore::connect(&url, &prefix, limits)
        .await
        .expect("b");
    let mut tokens = Vec::new();
    for store in [&a, &a, &b] {
        let (token, pending) = conformance::login(time::Duration::minutes(10));
        store
            .put(&token, pending)
            .await
            .expect("put below capacity");
        tokens.push(token);
    }
    let (extra, pending) = conformance::login(time::Duration::minutes(10));
    assert!(matches!(
        b.put(&extra, pending.clone()).await,
        Err(StateError::Full { capacity: 3 })
    ));
    assert_eq!(a.held().await.expect("held"), 3);

    // Issued on A, redeemed on B; the replay on A is refused.
    let fp = Fingerprint::of(&["code"]);
    let now = OffsetDateTime::now_utc();
    let claimed = b
        .claim(Kind::Login, &tokens[0], &fp, now)
        .await
        .expect("claim on B");
    b.finish(Kind::Login, &tokens[0], claimed.attempt)
        .await
        .expect("finish");
    assert!(matches!(
        a.claim(Kind::Login, &tokens[0], &fp, now).await,
        Err(StateError::AlreadyUsed)
    ));
    // B's finish freed a place for A.
    a.put(&extra, pending).await.expect("the freed place");
}

/// What Redis holds, read as an attacker would (every key, field and value,
/// and each key's serialised form), shows no secret that completes a login
/// or redeems a ticket; and every key expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_no_secret_at_rest() {
    let Some(url) = server().await else { return };
    let prefix = prefix();
    let store = RedisStateStore::connect(&url, &prefix, StateLimits::with_capacity(10))
        .await
        .expect("connect");
    let now = OffsetDateTime::now_utc();
    let progress =
        b"progress: the provider's access token gho_16C7e42F292c6912E7710c838347Ae178B4a";
    let payload = b"ticket: user 42 may link identity github:1234 with token ghu_secret";
    let ticket_progress = b"ticket progress: half linked, refresh token ghr_secret";

    // A login, claimed and released with progress: everything at once.
    let (token, pending) = conformance::login(time::Duration::minutes(10));
    let Pending::Login(login) = &pending else {
        unreachable!("conformance::login makes a login")
    };
    let (pkce, nonce) = (login.pkce.expect("pkce"), login.nonce.expect("nonce"));
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("the state".into(), token.as_str().into_bytes()),
        ("the state's bytes".into(), decoded(&token.as_str())),
        ("the PKCE verifier".into(), pkce.verifier().into_bytes()),
        (
            "the PKCE verifier's bytes".into(),
            decoded(&pkce.verifier()),
        ),
        ("the nonce".into(), nonce.verifier().into_bytes()),
        ("the nonce's bytes".into(), decoded(&nonce.verifier())),
        ("return_to".into(), b"/orders?id=3".to_vec()),
        (
            "the redirect URI".into(),
            login.redirect_uri.as_bytes().to_vec(),
        ),
        ("the login's progress".into(), progress.to_vec()),
        ("a ticket's payload".into(), payload.to_vec()),
        ("a ticket's progress".into(), ticket_progress.to_vec()),
    ];
    let fp = Fingerprint::of(&["code"]);
    put_claim_release(&store, &token, pending, &fp, progress).await;

    // A ticket, claimed and released with progress.
    let ticket = StateToken::generate().expect("rng");
    secrets.push(("the ticket".into(), ticket.as_str().into_bytes()));
    secrets.push(("the ticket's bytes".into(), decoded(&ticket.as_str())));
    let pending_ticket = Pending::Ticket {
        expires_at: now + time::Duration::minutes(15),
        payload: Arc::from(&payload[..]),
    };
    let user = Fingerprint::of(&["user-42"]);
    put_claim_release(&store, &ticket, pending_ticket, &user, ticket_progress).await;

    // A finished login (a tombstone) and a pending one.
    let (done, pending) = conformance::login(time::Duration::minutes(10));
    secrets.push(("a finished state".into(), done.as_str().into_bytes()));
    store.put(&done, pending).await.expect("put");
    let claimed = store
        .claim(Kind::Login, &done, &fp, now)
        .await
        .expect("claim");
    store
        .finish(Kind::Login, &done, claimed.attempt)
        .await
        .expect("finish");
    let (waiting, pending) = conformance::login(time::Duration::minutes(10));
    secrets.push(("a pending state".into(), waiting.as_str().into_bytes()));
    store.put(&waiting, pending).await.expect("put");

    let client = ::redis::Client::open(url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys = scan(&mut conn, &format!("{prefix}*")).await;
    // Four entries and the two live sets.
    assert_eq!(keys.len(), 6, "keys under the prefix: {keys:?}");
    for key in &keys {
        let mut seen = vec![key.as_bytes().to_vec()];
        let dump: Vec<u8> = ::redis::cmd("DUMP")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("DUMP");
        seen.push(dump);
        let kind: String = ::redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("TYPE");
        let parts: Vec<Vec<u8>> = match kind.as_str() {
            "hash" => {
                ::redis::cmd("HGETALL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
            }
            "zset" => {
                ::redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
            }
            other => panic!("{key} is a {other}: the backend writes hashes and sorted sets"),
        }
        .expect("read the key");
        seen.extend(parts);
        for (what, secret) in &secrets {
            assert!(
                !seen.iter().any(|value| contains(value, secret)),
                "{key} shows {what}"
            );
        }
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert!(ttl > 0, "{key} never expires (PTTL {ttl})");
    }
    let _: () = ::redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("clean up");
}

/// Puts `pending`, claims it and releases the claim with `progress`.
async fn put_claim_release(
    store: &RedisStateStore,
    token: &StateToken,
    pending: Pending,
    fingerprint: &Fingerprint,
    progress: &[u8],
) {
    let kind = pending.kind();
    store.put(token, pending).await.expect("put");
    let claimed = store
        .claim(kind, token, fingerprint, OffsetDateTime::now_utc())
        .await
        .expect("claim");
    store
        .release(kind, token, claimed.attempt, Some(progress.to_vec()))
        .await
        .expect("release");
}

fn decoded(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(text).expect("base64url")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn scan(conn: &mut ::redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1_000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}
