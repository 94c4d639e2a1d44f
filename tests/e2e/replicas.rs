//! Several replicas and rolling deploys, end to end: real `authbroker serve`
//! processes, a fresh Postgres database, the GitHub emulator as provider.
//!
//! - this file: three replicas A, B and C on one database share pending
//!   logins and link tickets through `[state]`, once with `postgres` and
//!   once with `redis`.
//! - [`shutdown`]: what a stopping replica tells its load balancer (Watch
//!   streams, draining), and health that covers the state backend.
//! - [`replica`]: the harness: one child process, its config and its calls.
//!
//! Redis is `TEST_REDIS_URL`, else `redis://127.0.0.1:6379/0`; without one
//! the Redis run says SKIPPED and passes, except in CI (`CI` set).

#[path = "replicas/replica.rs"]
mod replica;
#[path = "replicas/shutdown.rs"]
mod shutdown;

use std::time::Instant;

use crate::support::{
    assert_error,
    db::{self, TestDatabase},
    emulators::{
        Emulator,
        github::{GithubEmulator, GithubUser},
    },
};
use authbroker::{
    grpc::pb::Outcome,
    state::{RedisStateStore, StateLimits},
};
use futures::future::join_all;
use replica::{Client, Replica, config, github_provider, write_config};
use tonic::Code;

const LOCAL_REDIS: &str = "redis://127.0.0.1:6379/0";

/// What `[state]` the three replicas share.
enum Shared {
    Postgres,
    Redis { url: String, key_prefix: String },
}

/// A, B and C with one config, one database, one emulator. Fields drop in
/// order: the processes go before their database.
struct Deployment {
    replicas: [Replica; 3],
    emulator: GithubEmulator,
    _db: TestDatabase,
    _dir: tempfile::TempDir,
}

impl Deployment {
    async fn start(shared: Shared) -> Deployment {
        let db = db::fresh_database().await;
        let emulator = GithubEmulator::start().await;
        emulator.add_account(GithubUser::octocat());
        let state = match &shared {
            Shared::Postgres => "backend = \"postgres\"".to_string(),
            Shared::Redis { url, key_prefix } => {
                format!("backend = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{key_prefix}\"")
            }
        };
        let providers = [
            github_provider("github", &emulator, "auto_create"),
            github_provider("gh_link", &emulator, "link_required"),
        ];
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = config(&db.url, &state, &providers.join("\n"));
        let path = write_config(dir.path(), "replica", &config);
        // All three at once, as a deploy would: they migrate the same
        // database (and state table) concurrently.
        let mut replicas = ["A", "B", "C"].map(|name| Replica::spawn(name, &path));
        for replica in &mut replicas {
            replica.serving().await;
        }
        Deployment {
            replicas,
            emulator,
            _db: db,
            _dir: dir,
        }
    }

    /// Calls to A, B or C.
    fn client(&self, replica: usize) -> Client {
        self.replicas[replica].client()
    }

    /// BeginLogin at `provider` on `replica`, and the user's consent at the
    /// emulator: (state, code).
    async fn begin_and_consent(
        &self,
        replica: usize,
        provider: &str,
        login: &str,
    ) -> (String, String) {
        let client = self.client(replica);
        let begun = client
            .begin(provider)
            .await
            .unwrap_or_else(|e| panic!("BeginLogin on {}: {e:?}", client.name));
        let code = self
            .emulator
            .authorize(&begun.authorize_url, login)
            .expect("the emulator accepts the authorize URL");
        (begun.state, code)
    }
}

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_logins_on_postgres() {
    replicas_share_logins(Shared::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_logins_on_redis() {
    let Some(url) = redis_url().await else { return };
    let key_prefix = format!("authbroker-e2e:{}:", uuid::Uuid::new_v4().simple());
    replicas_share_logins(Shared::Redis { url, key_prefix }).await;
}

/// The Redis to use, if it answers; `None` after a loud SKIPPED, outside CI.
async fn redis_url() -> Option<String> {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| LOCAL_REDIS.to_string());
    let probe =
        RedisStateStore::connect(&url, "authbroker-e2e-probe:", StateLimits::with_capacity(1));
    match probe.await {
        Ok(_) => Some(url),
        Err(e) => {
            // The URL is not printed: TEST_REDIS_URL may hold a password.
            let why = format!("no Redis at TEST_REDIS_URL or {LOCAL_REDIS} ({e:?})");
            assert!(std::env::var_os("CI").is_none(), "{why}: CI needs one");
            eprintln!("SKIPPED: the multi-replica test on Redis: {why}");
            None
        }
    }
}

async fn replicas_share_logins(shared: Shared) {
    let started = Instant::now();
    let mut deployment = Deployment::start(shared).await;
    eprintln!("three replicas SERVING after {:?}", started.elapsed());

    let octocat = begun_on_a_completed_on_b_replayed_on_c(&deployment).await;
    a_restart_keeps_a_pending_login(&mut deployment, &octocat).await;
    a_link_ticket_from_a_is_redeemed_on_b(&deployment).await;
    concurrent_first_logins_create_one_user(&deployment).await;

    assert_eq!(deployment.emulator.violations(), Vec::<String>::new());
    eprintln!("all scenarios done after {:?}", started.elapsed());
}

/// Returns octocat's user id.
async fn begun_on_a_completed_on_b_replayed_on_c(deployment: &Deployment) -> String {
    let (b, c) = (deployment.client(B), deployment.client(C));
    let (state, code) = deployment.begin_and_consent(A, "github", "octocat").await;
    let done = b.complete(&state, &code).await.expect("CompleteLogin on B");
    assert_eq!(done.outcome(), Outcome::UserCreated);
    let user_id = done.binding.expect("a binding").user_id;

    let replay = c.complete(&state, &code).await.unwrap_err();
    assert_error(&replay, Code::FailedPrecondition, "STATE_ALREADY_USED");
    user_id
}

/// A deploy restarts A between BeginLogin and the callback: C completes
/// the login begun on A, and so does the new A.
async fn a_restart_keeps_a_pending_login(deployment: &mut Deployment, octocat: &str) {
    let first = deployment.begin_and_consent(A, "github", "octocat").await;
    let second = deployment.begin_and_consent(A, "github", "octocat").await;
    let restarted = Instant::now();
    deployment.replicas[A].restart().await;
    eprintln!("A restarted in {:?}", restarted.elapsed());

    for (replica, (state, code)) in [(C, first), (A, second)] {
        let client = deployment.client(replica);
        let done = client.complete(&state, &code).await.unwrap_or_else(|e| {
            panic!("CompleteLogin on {} after A restarted: {e:?}", client.name)
        });
        assert_eq!(done.outcome(), Outcome::SignedIn, "on {}", client.name);
        assert_eq!(done.binding.expect("a binding").user_id, octocat);
    }
}

/// `gh_link` is link_required: A issues the ticket, B redeems it, and C
/// hears it was used.
async fn a_link_ticket_from_a_is_redeemed_on_b(deployment: &Deployment) {
    let [a, b, c] = [A, B, C].map(|r| deployment.client(r));
    let (state, code) = deployment.begin_and_consent(A, "gh_link", "octocat").await;
    let done = a.complete(&state, &code).await.expect("CompleteLogin on A");
    assert_eq!(done.outcome(), Outcome::LinkRequired);
    assert!(done.binding.is_none(), "nothing is bound yet: {done:?}");
    let ticket = done.link_ticket;
    assert!(!ticket.is_empty());

    let app_user = "app-user-42";
    let linked = b.link(&ticket, app_user).await.expect("LinkIdentity on B");
    let binding = linked.binding.expect("a binding");
    assert_eq!(binding.provider, "gh_link");
    assert_eq!(binding.user_id, app_user);

    let again = c.link(&ticket, app_user).await.unwrap_err();
    assert_error(&again, Code::FailedPrecondition, "LINK_TICKET_ALREADY_USED");
}

/// 20 first logins of one GitHub account, completed at once round-robin on
/// A, B and C: one user, whom all 20 name.
async fn concurrent_first_logins_create_one_user(deployment: &Deployment) {
    const LOGINS: usize = 20;
    deployment
        .emulator
        .add_account(GithubUser::new(9_000_001, "crowd"));
    let users_before = deployment.client(A).user_ids().await;

    let mut callbacks = Vec::new();
    for i in 0..LOGINS {
        callbacks.push(deployment.begin_and_consent(i % 3, "github", "crowd").await);
    }
    let started = Instant::now();
    let completions = callbacks.iter().enumerate().map(|(i, (state, code))| {
        let client = deployment.client(i % 3);
        async move { (client.name, client.complete(state, code).await) }
    });
    let answers = join_all(completions).await;
    eprintln!(
        "{LOGINS} concurrent CompleteLogins took {:?}",
        started.elapsed()
    );

    let mut created = 0;
    let mut user_ids = Vec::new();
    for (name, answer) in answers {
        let done = answer.unwrap_or_else(|e| panic!("CompleteLogin on {name}: {e:?}"));
        match done.outcome() {
            Outcome::UserCreated => created += 1,
            Outcome::SignedIn => {}
            other => panic!("CompleteLogin on {name}: {other:?}"),
        }
        user_ids.push(done.binding.expect("a binding").user_id);
    }
    assert_eq!(created, 1, "exactly one login creates the user");
    user_ids.sort_unstable();
    user_ids.dedup();
    assert_eq!(
        user_ids.len(),
        1,
        "all {LOGINS} name one user: {user_ids:?}"
    );

    let users_after = deployment.client(B).user_ids().await;
    let new: Vec<&String> = users_after
        .iter()
        .filter(|u| !users_before.contains(u))
        .collect();
    assert_eq!(new, [&user_ids[0]], "one user more, the one all 20 named");
}
