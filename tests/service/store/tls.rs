//! Postgres over TLS: each `sslmode` behaves as libpq's, for the user store
//! and the Postgres state backend alike (they share one pool path).
//!
//! Needs the test server to speak TLS with a certificate for `DNS:localhost`
//! only, signed by the CA in `TEST_PG_CA_FILE` (or `ca.crt` beside the
//! server's `ssl_cert_file`): the `postgres TLS` step of `.ci/run` sets that
//! up on the local server. Without it these tests say so and pass, except
//! under CI (`CI` set), where they fail.

use std::path::{Path, PathBuf};

use authbroker::state::{PostgresStateStore, StateLimits, StateStore};
use authbroker::store::{Database, PostgresStore, StoreError};
use authbroker::telemetry::cause_chain;

use crate::support::db::{self, TestDatabase};

/// Stops a test that cannot run here: a failure under CI, a loud skip elsewhere.
fn cannot_run(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why} (.ci/run's `postgres TLS` step sets it up)");
    }
    eprintln!(
        "SKIPPED (CI unset): {why}. To test Postgres TLS here, run the `postgres TLS` \
         step of .ci/run (or give the server TLS and set TEST_PG_CA_FILE to its CA)."
    );
}

/// A fresh database on the test server, if that server speaks TLS.
pub(super) async fn tls_database() -> Option<TestDatabase> {
    let db = db::fresh_database().await;
    let ssl: String = db
        .client()
        .await
        .query_one("SHOW ssl", &[])
        .await
        .expect("SHOW ssl")
        .get(0);
    if ssl != "on" {
        cannot_run("the test Postgres server has ssl = off");
        return None;
    }
    Some(db)
}

/// The CA that signed the test server's certificate.
async fn ca_file(db: &TestDatabase) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TEST_PG_CA_FILE") {
        return Some(path.into());
    }
    let row = db
        .client()
        .await
        .query_one(
            "SELECT current_setting('data_directory'), current_setting('ssl_cert_file')",
            &[],
        )
        .await
        .expect("reading the server's ssl_cert_file");
    let cert = Path::new(row.get::<_, &str>(0)).join(row.get::<_, &str>(1));
    let ca = cert.with_file_name("ca.crt");
    if ca.is_file() {
        Some(ca)
    } else {
        cannot_run(&format!(
            "TEST_PG_CA_FILE is unset and there is no {} beside the server's certificate",
            ca.display()
        ));
        None
    }
}

/// A CA that signed nothing the server has.
fn other_ca(dir: &tempfile::TempDir) -> PathBuf {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let path = dir.path().join("other-ca.pem");
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

/// `url` with `params` added to its query.
pub(super) fn with(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// `url` naming the server `localhost`, the name in its certificate, while
/// still connecting to 127.0.0.1 (`hostaddr`), as libpq allows.
fn as_localhost(url: &str) -> Option<String> {
    if !url.contains("@127.0.0.1:") {
        cannot_run("the test Postgres server is not the local one at 127.0.0.1");
        return None;
    }
    Some(with(
        &url.replacen("@127.0.0.1:", "@localhost:", 1),
        "hostaddr=127.0.0.1",
    ))
}

/// Whether the sessions a store holds on `db` (all but ours) use TLS.
async fn store_sessions_use_tls(db: &TestDatabase) -> bool {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a \
             USING (pid) WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("reading pg_stat_ssl");
    assert!(row.get::<_, i64>(0) > 0, "the store holds no session");
    row.get::<_, Option<bool>>(1).unwrap_or(false)
}

/// A user store on `url` that has answered once: it holds a session.
async fn pinged(url: &str) -> PostgresStore {
    let store = PostgresStore::connect(url, 2).expect("connect");
    store.ping().await.expect("ping");
    store
}

/// The cause chain of a certificate the store refused, which must be an
/// outage (`Unavailable`) whose cause names the certificate problem.
async fn refused(url: &str) -> String {
    let store = PostgresStore::connect(url, 1).expect("the url is valid");
    let err = store
        .ping()
        .await
        .expect_err("the certificate must be refused");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let chain = cause_chain(&err);
    assert!(
        chain.contains("the database server's certificate was refused"),
        "{chain}"
    );
    chain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_uses_tls_without_checking_the_certificate() {
    let Some(db) = tls_database().await else {
        return;
    };
    let _store = pinged(&with(&db.url, "sslmode=require")).await;
    assert!(store_sessions_use_tls(&db).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_never_uses_tls() {
    let Some(db) = tls_database().await else {
        return;
    };
    let _store = pinged(&with(&db.url, "sslmode=disable")).await;
    assert!(!store_sessions_use_tls(&db).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_and_the_default_use_tls_when_offered() {
    let Some(db) = tls_database().await else {
        return;
    };
    // libpq's default sslmode is prefer.
    for url in [with(&db.url, "sslmode=prefer"), db.url.clone()] {
        let store = pinged(&url).await;
        assert!(store_sessions_use_tls(&db).await, "{url}");
        drop(store);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_checks_the_chain_but_not_the_name() {
    let Some(db) = tls_database().await else {
        return;
    };
    let Some(ca) = ca_file(&db).await else {
        return;
    };
    // 127.0.0.1 is not the certificate's name, which verify-ca ignores.
    let url = with(
        &db.url,
        &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    );
    let _store = pinged(&url).await;
    assert!(store_sessions_use_tls(&db).await);

    let dir = tempfile::tempdir().unwrap();
    let wrong = other_ca(&dir);
    let chain = refused(&with(
        &db.url,
        &format!("sslmode=verify-ca&sslrootcert={}", wrong.display()),
    ))
    .await;
    assert!(
        chain.contains("it is not signed by a CA in sslrootcert"),
        "{chain}"
    );
    assert!(chain.contains(&wrong.display().to_string()), "{chain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_with_a_root_certificate_checks_the_chain_like_libpq() {
    let Some(db) = tls_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wrong = other_ca(&dir);
    let chain = refused(&with(
        &db.url,
        &format!("sslmode=require&sslrootcert={}", wrong.display()),
    ))
    .await;
    assert!(chain.contains("sslmode=require"), "{chain}");
    assert!(
        chain.contains("it is not signed by a CA in sslrootcert"),
        "{chain}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name_too() {
    let Some(db) = tls_database().await else {
        return;
    };
    let Some(ca) = ca_file(&db).await else {
        return;
    };
    let Some(localhost) = as_localhost(&db.url) else {
        return;
    };
    let params = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let _store = pinged(&with(&localhost, &params)).await;
    assert!(store_sessions_use_tls(&db).await);

    // The certificate names localhost only.
    let chain = refused(&with(&db.url, &params)).await;
    assert!(
        chain.contains("certificate not valid for name \"127.0.0.1\""),
        "{chain}"
    );
    assert!(chain.contains("sslmode=verify-full"), "{chain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_backend_connects_the_same_way() {
    let Some(db) = tls_database().await else {
        return;
    };
    let states = PostgresStateStore::connect(
        &with(&db.url, "sslmode=require"),
        2,
        StateLimits::with_capacity(100),
    )
    .expect("connect");
    states.prepare().await.expect("prepare");
    states.ping().await.expect("ping");
    assert!(store_sessions_use_tls(&db).await);
    drop(states);

    let dir = tempfile::tempdir().unwrap();
    let wrong = other_ca(&dir);
    let states = PostgresStateStore::connect(
        &with(
            &db.url,
            &format!("sslmode=verify-ca&sslrootcert={}", wrong.display()),
        ),
        1,
        StateLimits::with_capacity(100),
    )
    .expect("connect");
    let err = states.ping().await.expect_err("the certificate is refused");
    let chain = cause_chain(&err);
    assert!(
        chain.contains("it is not signed by a CA in sslrootcert"),
        "{chain}"
    );
}

#[tokio::test]
async fn unusable_tls_parameters_are_invalid_urls() {
    for (params, expected) in [
        ("sslmode=verify-full", "needs sslrootcert"),
        ("sslmode=allow", "is not one of disable, prefer"),
        (
            "sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
            "cannot read certificates from /nonexistent/ca.pem",
        ),
    ] {
        let url = with("postgres://u:secret@db.internal/app", params);
        let err = PostgresStore::connect(&url, 1).unwrap_err();
        let StoreError::InvalidUrl(why) = &err else {
            panic!("{params}: {err:?}");
        };
        assert!(why.contains(expected), "{params}: {why}");
        assert!(!why.contains("secret"), "{why}");
    }
}
