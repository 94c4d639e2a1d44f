//! The `github` preset against the GitHub emulator: exact request shapes,
//! the stable numeric subject, emails, errors with HTTP 200 and every fault.

use std::time::{Duration, Instant};

use crate::support::{
    emulators::{
        Emulator,
        github::{self, Endpoint, GithubEmail, GithubEmulator, GithubUser},
    },
    faults::Fault,
    *,
};
use authbroker::{config::Settings, grpc::pb::Outcome};
use tonic::Code;
use tonic_types::StatusExt;

fn use_emulator(s: &mut Settings, emu: &GithubEmulator) {
    let mut p = provider("github", github::CLIENT_ID, github::CLIENT_SECRET);
    for (key, path) in [
        ("authorize_url", github::AUTHORIZE_PATH),
        ("token_url", github::TOKEN_PATH),
        ("userinfo_url", github::USER_PATH),
        ("emails_url", github::EMAILS_PATH),
    ] {
        p.endpoints.insert(key.into(), emu.url(path));
    }
    s.providers.insert("github".into(), p);
    s.http.timeout = Duration::from_secs(2);
    s.http.connect_timeout = Duration::from_secs(1);
}

async fn setup(backend: Backend) -> (TestApp, GithubEmulator) {
    let emu = GithubEmulator::start().await;
    emu.add_account(GithubUser::octocat());
    let app = spawn_app_on(backend, |s| use_emulator(s, &emu)).await;
    (app, emu)
}

async fn login_as(
    app: &TestApp,
    emu: &GithubEmulator,
    login: &str,
) -> Result<authbroker::grpc::pb::CompleteLoginResponse, tonic::Status> {
    let begun = app.begin_with("github").await;
    let code = emu
        .authorize(&begun.authorize_url, login)
        .expect("emulator accepts the authorize URL");
    app.complete(&begun.state, &code).await
}

async fn full_flow(backend: Backend) {
    let (app, emu) = setup(backend).await;
    let begun = app.begin_with("github").await;
    let url = url::Url::parse(&begun.authorize_url).unwrap();
    assert_eq!(url.path(), github::AUTHORIZE_PATH);
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], github::CLIENT_ID);
    assert_eq!(q["redirect_uri"], REDIRECT);
    assert_eq!(q["scope"], "read:user user:email");
    assert_eq!(q["state"], begun.state);
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(
        !q.contains_key("response_type"),
        "GitHub takes no response_type"
    );

    let code = emu.authorize(&begun.authorize_url, "octocat").unwrap();
    let done = app.complete(&begun.state, &code).await.unwrap();
    assert_eq!(done.outcome(), Outcome::UserCreated);
    let id = done.identity.unwrap();
    assert_eq!(
        id.subject, "583231",
        "subject is the numeric id, never the login"
    );
    assert_eq!(id.username, "octocat");
    assert_eq!(id.display_name, "The Octocat");
    assert_eq!(id.email, "octocat@github.com");
    assert!(id.email_verified);
    assert_eq!(
        id.avatar_url,
        "https://avatars.githubusercontent.com/u/583231?v=4"
    );

    let token = emu.requests_to(github::TOKEN_PATH);
    assert_eq!(token.len(), 1);
    let t = &token[0];
    assert_eq!(t.method, "POST");
    assert!(
        t.content_type
            .as_deref()
            .unwrap()
            .starts_with("application/x-www-form-urlencoded")
    );
    assert_eq!(t.accept.as_deref(), Some("application/json"));
    assert!(t.user_agent.as_deref().unwrap().starts_with("authbroker/"));
    assert_eq!(t.param("client_id"), Some(github::CLIENT_ID));
    assert!(t.param("client_secret").is_some());
    assert!(t.param("code_verifier").is_some());
    assert_eq!(t.param("redirect_uri"), Some(REDIRECT));
    let user = &emu.requests_to(github::USER_PATH)[0];
    assert_eq!(user.authorization.as_deref(), Some("Bearer"));
    assert!(user.user_agent.is_some());
    assert_eq!(emu.requests_to(github::EMAILS_PATH).len(), 1);
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());

    let again = login_as(&app, &emu, "octocat").await.unwrap();
    assert_eq!(again.outcome(), Outcome::SignedIn);
    assert_eq!(
        again.binding.unwrap().user_id,
        done.binding.unwrap().user_id
    );
    assert_eq!(app.store.count_users().await.unwrap(), 1);
}

#[tokio::test]
async fn full_flow_on_postgres() {
    full_flow(Backend::Postgres).await;
}

#[tokio::test]
async fn full_flow_on_sqlite() {
    full_flow(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_renamed_account_keeps_its_binding_and_its_old_name_is_someone_else() {
    let (app, emu) = setup(Backend::Postgres).await;
    let first = login_as(&app, &emu, "octocat").await.unwrap();
    let user_id = first.binding.unwrap().user_id;

    // octocat renames to hubot; a stranger registers the freed name.
    emu.add_account(GithubUser::new(583231, "hubot").name("The Octocat"));
    emu.add_account(GithubUser::new(999001, "octocat"));
    let renamed = login_as(&app, &emu, "hubot").await.unwrap();
    assert_eq!(renamed.outcome(), Outcome::SignedIn);
    assert_eq!(renamed.binding.unwrap().user_id, user_id);
    let stored = app
        .store
        .find_identity("github", "583231")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.username.as_deref(), Some("hubot"));

    let stranger = login_as(&app, &emu, "octocat").await.unwrap();
    assert_eq!(stranger.outcome(), Outcome::UserCreated);
    assert_ne!(stranger.binding.unwrap().user_id, user_id);
    // No name: the display name falls back to the login.
    assert_eq!(stranger.identity.unwrap().display_name, "octocat");
}

#[tokio::test]
async fn emails_need_the_scope_and_must_be_primary_and_verified() {
    let (app, emu) = setup(Backend::Postgres).await;
    emu.add_account(
        GithubUser::new(7, "mona")
            .public_email("mona@public.example")
            .with_email(GithubEmail::new(
                "mona@unverified.example",
                true,
                false,
                Some("private"),
            ))
            .with_email(GithubEmail::secondary("mona@other.example", true)),
    );
    // Primary is unverified: no verified email; the public one, unverified.
    let done = login_as(&app, &emu, "mona").await.unwrap();
    let id = done.identity.unwrap();
    assert_eq!(id.email, "mona@public.example");
    assert!(!id.email_verified);

    // The user grants only read:user: /user/emails is not called at all.
    emu.clear_requests();
    let begun = app.begin_with("github").await;
    let code = emu
        .authorize_with_scopes(&begun.authorize_url, "octocat", &["read:user"])
        .unwrap();
    let done = app.complete(&begun.state, &code).await.unwrap();
    let id = done.identity.unwrap();
    assert_eq!(id.email, "");
    assert!(!id.email_verified);
    assert!(emu.requests_to(github::EMAILS_PATH).is_empty());
}

#[tokio::test]
async fn token_errors_with_http_200_are_rejections_and_persist_nothing() {
    let (app, emu) = setup(Backend::Postgres).await;
    // A code GitHub never issued.
    let begun = app.begin_with("github").await;
    let err = app
        .complete(&begun.state, "0123456789abcdef0123")
        .await
        .unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "PROVIDER_REJECTED");
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.metadata["provider_error"], "bad_verification_code");
    assert_eq!(info.metadata["provider"], "github");

    // A code used once already.
    let begun = app.begin_with("github").await;
    let code = emu.authorize(&begun.authorize_url, "octocat").unwrap();
    app.complete(&begun.state, &code).await.unwrap();
    let begun2 = app.begin_with("github").await;
    let err = app.complete(&begun2.state, &code).await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "PROVIDER_REJECTED");
    assert_eq!(app.store.count_users().await.unwrap(), 1);
}

#[tokio::test]
async fn wrong_client_secret_is_rejected() {
    let emu = GithubEmulator::start().await;
    emu.add_account(GithubUser::octocat());
    let app = spawn_app(|s| {
        use_emulator(s, &emu);
        s.providers.get_mut("github").unwrap().client_secret = Some("wrong".into());
    })
    .await;
    let err = login_as(&app, &emu, "octocat").await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "PROVIDER_REJECTED");
    assert_eq!(
        err.get_details_error_info().unwrap().metadata["provider_error"],
        "incorrect_client_credentials"
    );
    assert!(!err.message().contains("wrong"));
}

#[tokio::test]
async fn every_injected_fault_maps_to_a_clear_error() {
    let (app, emu) = setup(Backend::Postgres).await;
    let cases = [
        (
            Endpoint::Token,
            Fault::Status500,
            Code::Unavailable,
            "PROVIDER_UNAVAILABLE",
        ),
        (
            Endpoint::Token,
            Fault::Status503,
            Code::Unavailable,
            "PROVIDER_UNAVAILABLE",
        ),
        (
            Endpoint::Token,
            Fault::Garbage,
            Code::Internal,
            "PROVIDER_BAD_RESPONSE",
        ),
        (
            Endpoint::Token,
            Fault::Oversized(2 << 20),
            Code::Internal,
            "PROVIDER_BAD_RESPONSE",
        ),
        (
            Endpoint::Token,
            Fault::Hang,
            Code::Unavailable,
            "PROVIDER_UNAVAILABLE",
        ),
        (
            Endpoint::Token,
            Fault::CloseConnection,
            Code::Unavailable,
            "PROVIDER_UNAVAILABLE",
        ),
        (
            Endpoint::User,
            Fault::Status500,
            Code::Unavailable,
            "PROVIDER_UNAVAILABLE",
        ),
        (
            Endpoint::User,
            Fault::Garbage,
            Code::Internal,
            "PROVIDER_BAD_RESPONSE",
        ),
        (
            Endpoint::User,
            Fault::Oversized(2 << 20),
            Code::Internal,
            "PROVIDER_BAD_RESPONSE",
        ),
        (
            Endpoint::User,
            Fault::Hang,
            Code::Unavailable,
            "PROVIDER_UNAVAILABLE",
        ),
        (
            Endpoint::Emails,
            Fault::Status503,
            Code::Unavailable,
            "PROVIDER_UNAVAILABLE",
        ),
        (
            Endpoint::Emails,
            Fault::Garbage,
            Code::Internal,
            "PROVIDER_BAD_RESPONSE",
        ),
    ];
    for (endpoint, fault, code, reason) in cases {
        emu.clear_faults();
        emu.set_endpoint_fault(endpoint, fault.clone());
        let started = Instant::now();
        let err = login_as(&app, &emu, "octocat").await.unwrap_err();
        assert_error(&err, code, reason);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{endpoint:?} {fault:?} took {:?}; the 2 s timeout must cut it",
            started.elapsed()
        );
        assert_eq!(
            app.store.count_users().await.unwrap(),
            0,
            "{endpoint:?} {fault:?}"
        );
    }

    // A slow provider within the timeout is fine.
    emu.clear_faults();
    emu.set_endpoint_fault(Endpoint::Token, Fault::Slow(Duration::from_millis(300)));
    let done = login_as(&app, &emu, "octocat").await.unwrap();
    assert_eq!(done.outcome(), Outcome::UserCreated);
}

#[tokio::test]
async fn unreachable_provider_is_unavailable() {
    let emu = GithubEmulator::start().await;
    emu.add_account(GithubUser::octocat());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/token", closed.local_addr().unwrap());
    drop(closed);
    let app = spawn_app(|s| {
        use_emulator(s, &emu);
        s.providers
            .get_mut("github")
            .unwrap()
            .endpoints
            .insert("token_url".into(), dead);
    })
    .await;
    let err = login_as(&app, &emu, "octocat").await.unwrap_err();
    assert_error(&err, Code::Unavailable, "PROVIDER_UNAVAILABLE");
}

/// CompleteLogin retried after a failure at each step of a login, on both
/// stores: the retry with the same state and code resumes where the failed
/// call stopped, returns what a lost commit committed, and never sends the
/// code to the provider twice.
mod retries {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use async_trait::async_trait;
    use authbroker::{
        app::Wrap,
        grpc::pb::Outcome,
        state::{Claimed, Fingerprint, Kind, Pending, StateError, StateStore, StateToken},
        store::{
            BindResult, StoreError,
            interposed::{Hooks, Interposed},
        },
    };
    use time::OffsetDateTime;
    use tonic::Code;

    use super::*;

    /// Injected store faults, each armed for a number of calls.
    #[derive(Default)]
    struct StoreFaults {
        /// The database is unreachable: the bind never starts.
        before_bind: AtomicU32,
        /// The bind commits, then its acknowledgement is lost.
        after_bind: AtomicU32,
    }

    fn take_one(n: &AtomicU32) -> bool {
        n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
    }

    #[async_trait]
    impl Hooks for StoreFaults {
        async fn before_bind(&self) -> Result<(), StoreError> {
            if take_one(&self.before_bind) {
                return Err(StoreError::Unavailable(anyhow::anyhow!(
                    "injected: the database is unreachable"
                )));
            }
            Ok(())
        }

        async fn after_bind(
            &self,
            result: Result<BindResult, StoreError>,
        ) -> Result<BindResult, StoreError> {
            if result.is_ok() && take_one(&self.after_bind) {
                return Err(StoreError::Unavailable(anyhow::anyhow!(
                    "injected: the commit's acknowledgement was lost"
                )));
            }
            result
        }
    }

    /// The real state store, with its claim or put failing while armed.
    struct FlakyStates {
        inner: Arc<dyn StateStore>,
        fail_claim: AtomicU32,
        fail_ticket_put: AtomicU32,
    }

    fn state_down() -> StateError {
        StateError::Unavailable(anyhow::anyhow!("injected: the state backend is down"))
    }

    #[async_trait]
    impl StateStore for FlakyStates {
        fn backend(&self) -> &'static str {
            self.inner.backend()
        }
        async fn put(&self, token: &StateToken, pending: Pending) -> Result<(), StateError> {
            if pending.kind() == Kind::Ticket && take_one(&self.fail_ticket_put) {
                return Err(state_down());
            }
            self.inner.put(token, pending).await
        }
        async fn claim(
            &self,
            kind: Kind,
            token: &StateToken,
            fingerprint: &Fingerprint,
            now: OffsetDateTime,
        ) -> Result<Claimed, StateError> {
            if take_one(&self.fail_claim) {
                return Err(state_down());
            }
            self.inner.claim(kind, token, fingerprint, now).await
        }
        async fn release(
            &self,
            kind: Kind,
            token: &StateToken,
            attempt: u32,
            progress: Option<Vec<u8>>,
        ) -> Result<(), StateError> {
            self.inner.release(kind, token, attempt, progress).await
        }
        async fn finish(
            &self,
            kind: Kind,
            token: &StateToken,
            attempt: u32,
        ) -> Result<(), StateError> {
            self.inner.finish(kind, token, attempt).await
        }
        async fn cancel(
            &self,
            kind: Kind,
            token: &StateToken,
            now: OffsetDateTime,
        ) -> Result<(), StateError> {
            self.inner.cancel(kind, token, now).await
        }
        async fn ping(&self) -> Result<(), StateError> {
            self.inner.ping().await
        }
        async fn held(&self) -> Result<u64, StateError> {
            self.inner.held().await
        }
    }

    struct Rig {
        app: TestApp,
        emu: GithubEmulator,
        store_faults: Arc<StoreFaults>,
        states: Arc<FlakyStates>,
    }

    async fn rig(backend: Backend, configure: impl FnOnce(&mut Settings)) -> Rig {
        let emu = GithubEmulator::start().await;
        emu.add_account(GithubUser::octocat());
        let store_faults = Arc::new(StoreFaults::default());
        let hooks = store_faults.clone();
        let (states_tx, states_rx) = std::sync::mpsc::channel();
        let wrap = Wrap {
            store: Some(Box::new(move |inner| {
                Arc::new(Interposed::new(inner, hooks)) as _
            })),
            states: Some(Box::new(move |inner| {
                let flaky = Arc::new(FlakyStates {
                    inner,
                    fail_claim: AtomicU32::new(0),
                    fail_ticket_put: AtomicU32::new(0),
                });
                let _ = states_tx.send(flaky.clone());
                flaky as _
            })),
        };
        let app = spawn_app_wrapped(
            backend,
            |s| {
                use_emulator(s, &emu);
                configure(s);
            },
            wrap,
        )
        .await;
        let states = states_rx.recv().expect("the app was built");
        Rig {
            app,
            emu,
            store_faults,
            states,
        }
    }

    impl Rig {
        async fn begin(&self) -> (String, String) {
            let begun = self.app.begin_with("github").await;
            let code = self
                .emu
                .authorize(&begun.authorize_url, "octocat")
                .expect("emulator accepts the authorize URL");
            (begun.state, code)
        }

        fn token_calls(&self) -> usize {
            self.emu.requests_to(github::TOKEN_PATH).len()
        }
    }

    macro_rules! on_both_stores {
        ($($name:ident),* $(,)?) => {
            mod postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::Postgres).await } )* }
            mod sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::Sqlite).await } )* }
        };
    }

    on_both_stores!(
        store_down_before_the_commit,
        commit_acknowledgement_lost,
        provider_down_after_the_exchange,
        provider_down_during_the_exchange_is_not_retried,
        token_endpoint_unreachable_is_retried,
        state_backend_down_at_claim,
        state_backend_down_when_issuing_the_link_ticket,
        a_concurrent_retry_is_told_to_wait,
    );

    async fn store_down_before_the_commit(backend: Backend) {
        let rig = rig(backend, |_| {}).await;
        let (state, code) = rig.begin().await;
        rig.store_faults.before_bind.store(1, Ordering::SeqCst);
        let err = rig.app.complete(&state, &code).await.unwrap_err();
        assert_error(&err, Code::Unavailable, "STORE_UNAVAILABLE");
        assert_eq!(rig.app.store.count_users().await.unwrap(), 0);

        let done = rig.app.complete(&state, &code).await.expect("the retry");
        assert_eq!(done.outcome(), Outcome::UserCreated);
        assert_eq!(rig.token_calls(), 1, "the code was exchanged once");
        assert_eq!(rig.app.store.count_users().await.unwrap(), 1);
        let replay = rig.app.complete(&state, &code).await.unwrap_err();
        assert_error(&replay, Code::FailedPrecondition, "STATE_ALREADY_USED");
    }

    async fn commit_acknowledgement_lost(backend: Backend) {
        let rig = rig(backend, |_| {}).await;
        let (state, code) = rig.begin().await;
        rig.store_faults.after_bind.store(1, Ordering::SeqCst);
        let err = rig.app.complete(&state, &code).await.unwrap_err();
        assert_error(&err, Code::Unavailable, "STORE_UNAVAILABLE");
        let committed = rig
            .app
            .store
            .find_binding("github", "583231")
            .await
            .unwrap()
            .expect("the first attempt committed");

        let done = rig.app.complete(&state, &code).await.expect("the retry");
        assert_eq!(
            done.outcome(),
            Outcome::UserCreated,
            "the retry answers what the first attempt committed"
        );
        let binding = done.binding.unwrap();
        assert_eq!(binding.user_id, committed.user_id);
        assert_eq!(rig.token_calls(), 1, "the code was exchanged once");
        assert_eq!(rig.app.store.count_users().await.unwrap(), 1);
        let succeeded = rig
            .app
            .store
            .list_audit_events(&authbroker::store::AuditQuery {
                kind: Some(authbroker::domain::AuditKind::LoginSucceeded),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(succeeded.len(), 1, "one login, one login_succeeded");

        // A later login of the same person is a returning login as usual.
        let (state, code) = rig.begin().await;
        let again = rig.app.complete(&state, &code).await.unwrap();
        assert_eq!(again.outcome(), Outcome::SignedIn);
    }

    async fn provider_down_after_the_exchange(backend: Backend) {
        let rig = rig(backend, |_| {}).await;
        let (state, code) = rig.begin().await;
        rig.emu
            .set_endpoint_fault_times(github::Endpoint::User, Fault::Status503, 1);
        let err = rig.app.complete(&state, &code).await.unwrap_err();
        assert_error(&err, Code::Unavailable, "PROVIDER_UNAVAILABLE");

        let done = rig.app.complete(&state, &code).await.expect("the retry");
        assert_eq!(done.outcome(), Outcome::UserCreated);
        assert_eq!(done.identity.unwrap().subject, "583231");
        assert_eq!(rig.token_calls(), 1, "the retry reused the tokens");
        assert_eq!(rig.emu.requests_to(github::USER_PATH).len(), 2);
    }

    async fn provider_down_during_the_exchange_is_not_retried(backend: Backend) {
        let rig = rig(backend, |_| {}).await;
        let (state, code) = rig.begin().await;
        rig.emu
            .set_endpoint_fault_times(github::Endpoint::Token, Fault::Status503, 1);
        let err = rig.app.complete(&state, &code).await.unwrap_err();
        assert_error(&err, Code::Unavailable, "PROVIDER_UNAVAILABLE");
        // The provider may have seen the code: a second exchange could
        // revoke what the first one issued, so the state is spent.
        let retry = rig.app.complete(&state, &code).await.unwrap_err();
        assert_error(&retry, Code::FailedPrecondition, "STATE_ALREADY_USED");
        assert_eq!(rig.token_calls(), 1, "the code was sent once");
        assert_eq!(rig.app.store.count_users().await.unwrap(), 0);
    }

    async fn token_endpoint_unreachable_is_retried(backend: Backend) {
        // Nothing listens on the token URL: the code never left.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}/token", closed.local_addr().unwrap());
        drop(closed);
        let rig = rig(backend, |s| {
            let p = s.providers.get_mut("github").unwrap();
            p.endpoints.insert("token_url".into(), dead);
        })
        .await;
        let (state, code) = rig.begin().await;
        for attempt in 0..2 {
            let err = rig.app.complete(&state, &code).await.unwrap_err();
            assert_error(&err, Code::Unavailable, "PROVIDER_UNAVAILABLE");
            assert!(
                !err.message().contains("already used"),
                "attempt {attempt}: {err:?}"
            );
        }
        let other = rig.app.complete(&state, "another-code").await.unwrap_err();
        assert_error(&other, Code::FailedPrecondition, "STATE_ALREADY_USED");
    }

    async fn state_backend_down_at_claim(backend: Backend) {
        let rig = rig(backend, |_| {}).await;
        let (state, code) = rig.begin().await;
        rig.states.fail_claim.store(1, Ordering::SeqCst);
        let err = rig.app.complete(&state, &code).await.unwrap_err();
        assert_error(&err, Code::Unavailable, "STATE_STORE_UNAVAILABLE");
        assert_eq!(rig.token_calls(), 0);
        let done = rig.app.complete(&state, &code).await.expect("the retry");
        assert_eq!(done.outcome(), Outcome::UserCreated);
    }

    async fn state_backend_down_when_issuing_the_link_ticket(backend: Backend) {
        let rig = rig(backend, |s| {
            s.login.policy = authbroker::config::Policy::LinkRequired;
        })
        .await;
        let (state, code) = rig.begin().await;
        rig.states.fail_ticket_put.store(1, Ordering::SeqCst);
        let err = rig.app.complete(&state, &code).await.unwrap_err();
        assert_error(&err, Code::Unavailable, "STATE_STORE_UNAVAILABLE");

        let done = rig.app.complete(&state, &code).await.expect("the retry");
        assert_eq!(done.outcome(), Outcome::LinkRequired);
        assert_eq!(rig.token_calls(), 1);
        let linked = rig
            .app
            .link(&done.link_ticket, "app-user-7")
            .await
            .expect("the ticket links");
        assert_eq!(linked.binding.unwrap().user_id, "app-user-7");
    }

    async fn a_concurrent_retry_is_told_to_wait(backend: Backend) {
        let rig = rig(backend, |_| {}).await;
        let (state, code) = rig.begin().await;
        rig.emu.set_endpoint_fault_times(
            github::Endpoint::User,
            Fault::Slow(Duration::from_millis(1_500)),
            1,
        );
        let (first, second) = tokio::join!(rig.app.complete(&state, &code), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            rig.app.complete(&state, &code).await
        });
        assert_eq!(
            first.expect("the first call").outcome(),
            Outcome::UserCreated
        );
        let err = second.unwrap_err();
        assert_error(&err, Code::Aborted, "LOGIN_IN_PROGRESS");
        assert_eq!(rig.token_calls(), 1);
    }
}
