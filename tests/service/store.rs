//! The store conformance suite on both backends, plus backend-specific
//! behaviour: SQLite in memory and on disk, failure classification when
//! the database cannot be reached, Postgres over TLS (`tls`), and the
//! round trips a Postgres login takes (`round_trips`).
//!
//! Run with `cargo test --features test-util --test service -- store::`.

use crate::support::db;
#[path = "store/round_trips.rs"]
mod round_trips;
#[path = "store/tls.rs"]
mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use authbroker::domain::{Identity, Outcome, now_micros};
use authbroker::login::binding::decide;
use authbroker::store::{
    self, AuditLog, AuditQuery, BindPolicy, BindResult, BindingStore, Database, LoginRecord,
    PostgresStore, SqliteStore, Store, StoreError, TokenStore, UserDirectory, UserQuery,
    conformance,
};

/// `auto_create`: every login binds.
fn create() -> BindPolicy {
    BindPolicy {
        create_user: true,
        ..BindPolicy::default()
    }
}

fn outcome(result: BindResult) -> Outcome {
    match result {
        BindResult::Bound { outcome, .. } => outcome,
        BindResult::LinkRequired => panic!("auto_create always binds"),
    }
}

async fn postgres_store(db: &db::TestDatabase) -> Arc<dyn Store> {
    // Fewer connections than the 20 concurrent logins, so that scenario also
    // queues on the pool.
    Arc::new(PostgresStore::connect(&db.url, 5).expect("connect"))
}

fn sqlite_store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(&dir.path().join("authbroker.db")).expect("open sqlite"))
}

/// One test per scenario and backend, so a failure names both.
macro_rules! conformance_tests {
    ($($scenario:ident),* $(,)?) => {
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let db = db::fresh_database().await;
                    conformance::$scenario(postgres_store(&db).await, decide).await;
                }
            )*
        }

        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    conformance::$scenario(sqlite_store(&dir), decide).await;
                }
            )*
        }
    };
}

authbroker::for_each_store_scenario!(conformance_tests);

/// Scenarios must not depend on starting from an empty database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_all_scenarios_share_one_database() {
    let db = db::fresh_database().await;
    let store = store::open(&db.url, 5).await.expect("open by url");
    conformance::run_all(Arc::clone(&store), decide).await;
    conformance::run_all(store, decide).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_all_scenarios_share_one_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let store = store::open(&url, 1).await.expect("open by url");
    conformance::run_all(Arc::clone(&store), decide).await;
    conformance::run_all(store, decide).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_in_memory_store_works() {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().expect("in memory"));
    conformance::run_all(store, decide).await;

    let by_url = store::open("sqlite::memory:", 1)
        .await
        .expect("open by url");
    by_url.migrate().await.expect("migrate");
    assert_eq!(by_url.count_users().await.expect("count"), 0);
}

#[tokio::test]
async fn sqlite_creates_parent_directories_and_persists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir
        .path()
        .join("nested")
        .join("deeper")
        .join("authbroker.db");
    let identity = Identity {
        provider: "github".into(),
        subject: "583231".into(),
        display_name: Some("Octocat".into()),
        ..Identity::default()
    };

    let binding = {
        let store = SqliteStore::open(&path).expect("open creates directories");
        store.migrate().await.expect("migrate");
        let result = store
            .bind_login(&identity, &create(), decide, LoginRecord::at(now_micros()))
            .await
            .expect("bind");
        let BindResult::Bound {
            outcome, binding, ..
        } = result
        else {
            panic!("auto_create always binds");
        };
        assert_eq!(outcome, Outcome::UserCreated);
        binding
    };
    assert!(path.is_file());

    let reopened = SqliteStore::open(&path).expect("reopen");
    reopened.migrate().await.expect("migrate again");
    assert_eq!(
        reopened
            .find_binding("github", "583231")
            .await
            .expect("find"),
        Some(binding)
    );
    assert_eq!(
        reopened
            .find_identity("github", "583231")
            .await
            .expect("find"),
        Some(identity)
    );
}

#[tokio::test]
async fn sqlite_locked_by_another_process_is_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("authbroker.db");
    let store = SqliteStore::open(&path).expect("open");
    store.migrate().await.expect("migrate");

    // Another writer (as another process would) holds the write lock for
    // longer than the store's busy timeout.
    let other = rusqlite::Connection::open(&path).expect("second connection");
    other
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");

    let identity = Identity {
        provider: "qq".into(),
        subject: "1".into(),
        ..Identity::default()
    };
    let started = Instant::now();
    let err = store
        .bind_login(&identity, &create(), decide, LoginRecord::at(now_micros()))
        .await
        .expect_err("the write lock is held elsewhere");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(15));

    other.execute_batch("ROLLBACK").expect("release");
    let result = store
        .bind_login(&identity, &create(), decide, LoginRecord::at(now_micros()))
        .await
        .expect("works once the lock is released");
    assert_eq!(outcome(result), Outcome::UserCreated);
}

#[tokio::test]
async fn postgres_unreachable_is_unavailable_and_fails_fast() {
    // Port 1 on loopback: nothing listens, the connection is refused.
    let store = PostgresStore::connect("postgres://postgres@127.0.0.1:1/x", 2)
        .expect("the pool is built lazily");
    let identity = Identity {
        provider: "github".into(),
        subject: "1".into(),
        ..Identity::default()
    };

    let started = Instant::now();
    let ping = store.ping().await.expect_err("nothing listens");
    assert!(matches!(ping, StoreError::Unavailable(_)), "{ping:?}");
    let bind = store
        .bind_login(&identity, &create(), decide, LoginRecord::at(now_micros()))
        .await
        .expect_err("nothing listens");
    assert!(matches!(bind, StoreError::Unavailable(_)), "{bind:?}");
    let link = store
        .link_identity("u", &identity, None, None, now_micros())
        .await
        .expect_err("nothing listens");
    assert!(matches!(link, StoreError::Unavailable(_)), "{link:?}");
    let user = store.get_user("u").await.expect_err("nothing listens");
    assert!(matches!(user, StoreError::Unavailable(_)), "{user:?}");
    let users = store
        .list_users(&UserQuery::default())
        .await
        .expect_err("nothing listens");
    assert!(matches!(users, StoreError::Unavailable(_)), "{users:?}");
    let token = store
        .put_token("github", "1", &sealed(), None)
        .await
        .expect_err("nothing listens");
    assert!(matches!(token, StoreError::Unavailable(_)), "{token:?}");
    let events = store
        .list_audit_events(&AuditQuery::default())
        .await
        .expect_err("nothing listens");
    assert!(matches!(events, StoreError::Unavailable(_)), "{events:?}");
    let migrate = store.migrate().await.expect_err("nothing listens");
    assert!(matches!(migrate, StoreError::Unavailable(_)), "{migrate:?}");
    let count = store.count_users().await.expect_err("nothing listens");
    assert!(matches!(count, StoreError::Unavailable(_)), "{count:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn postgres_black_hole_times_out_as_unavailable() {
    // 192.0.2.0/24 (TEST-NET-1) is never routed: the connect hangs until the
    // pool's create timeout, which must turn into Unavailable, not a hang.
    let store = PostgresStore::connect("postgres://postgres@192.0.2.1:5432/x", 2)
        .expect("the pool is built lazily");
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(15), store.ping())
        .await
        .expect("ping must give up on its own")
        .expect_err("nothing answers");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// The V2 indexes (and V1's union id index) serve the queries they were made
/// for.
#[tokio::test]
async fn postgres_lookups_can_use_their_indexes() {
    let db = db::fresh_database().await;
    postgres_store(&db).await.migrate().await.expect("migrate");
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let connection = tokio::spawn(connection);
    // Sequential scans off (the tables are tiny), and generic plans, as the
    // store's cached prepared statements get.
    client
        .batch_execute("SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan")
        .await
        .expect("set");
    let cases = [
        (
            "SELECT user_id FROM identities WHERE email_verified AND lower(email) = lower($1) \
             ORDER BY created_at, provider, subject LIMIT 1",
            "identities_verified_email_idx",
        ),
        (
            "SELECT user_id FROM identities WHERE provider = ANY($1) AND union_id = $2 \
             ORDER BY created_at, provider, subject LIMIT 1",
            "identities_union_id_idx",
        ),
        (
            "SELECT id, created_at FROM users WHERE (created_at, id) < ($1, $2) \
             ORDER BY created_at DESC, id DESC LIMIT 10",
            "users_created_at_idx",
        ),
        (
            "SELECT id FROM audit_events WHERE user_id = $1 AND id < $2 ORDER BY id DESC LIMIT 10",
            "audit_events_user_id_idx",
        ),
    ];
    for (sql, index) in cases {
        // EXPLAIN EXECUTE of a named prepared statement shows the plan its
        // parameters get; NULLs of the right types stand in for them.
        let statement = client.prepare(sql).await.expect("prepare");
        let nulls = statement
            .params()
            .iter()
            .map(|t| format!("NULL::{}", t.name()))
            .collect::<Vec<_>>()
            .join(", ");
        let name = format!("q{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("PREPARE {name} AS {sql}"))
            .await
            .expect("prepare");
        let explain = if nulls.is_empty() {
            format!("EXPLAIN EXECUTE {name}")
        } else {
            format!("EXPLAIN EXECUTE {name}({nulls})")
        };
        let plan: Vec<String> = client
            .query(&explain, &[])
            .await
            .expect("explain")
            .iter()
            .map(|row| row.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains(index), "{sql}\n{plan}");
    }
    drop(client);
    let _ = connection.await;
}

#[tokio::test]
async fn malformed_postgres_url_is_invalid() {
    let err = store::open("postgres://user@host:port-is-not-a-number/db", 2)
        .await
        .err()
        .expect("malformed url");
    assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
}

fn sealed() -> authbroker::domain::SealedToken {
    authbroker::domain::SealedToken {
        key_id: "k1".into(),
        nonce: vec![0; 12],
        ciphertext: vec![1, 2, 3],
        version: 0,
        usable: true,
        updated_at: now_micros(),
    }
}
