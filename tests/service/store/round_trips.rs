//! Round trips per login on Postgres (issue 12): a returning login is one
//! statement, one flight of messages, under any policy; a first login under
//! a policy without linking rules is two (the returning statement finds no
//! binding, then one statement creates the user). Counted as the load
//! generator counts them, by the store's `ROUND_TRIPS` counter, which TLS
//! connections keep (so this needs the test server's TLS, as `tls` does).

use authbroker::domain::{Identity, Outcome, now_micros};
use authbroker::login::binding::decide;
use authbroker::store::{self, BindPolicy, BindResult, BindingStore, Database, LoginRecord};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

use super::tls::{tls_database, with};

/// Round trips counted since the last call (the recorder drains counters).
fn round_trips(snapshotter: &Snapshotter) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == store::ROUND_TRIPS)
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            other => panic!("{} is a counter, not {other:?}", store::ROUND_TRIPS),
        })
        .sum()
}

fn identity(subject: &str) -> Identity {
    Identity {
        provider: "github".into(),
        subject: subject.into(),
        username: Some("octocat".into()),
        ..Identity::default()
    }
}

// The counter's handle is taken when a connection opens, from the recorder
// of the thread that opens it: a current-thread runtime inside a local
// recorder makes every connection of this test count into `recorder`.
#[test]
fn a_returning_login_takes_one_round_trip_and_a_first_login_two() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let Some(db) = tls_database().await else {
                return;
            };
            let url = with(&db.url, "sslmode=require");
            let store = store::PostgresStore::connect(&url, 1).expect("connect");
            store.migrate().await.expect("migrate");
            let create = BindPolicy {
                create_user: true,
                ..BindPolicy::default()
            };
            let link_required = BindPolicy::default();
            let login = |identity: Identity, policy: BindPolicy| {
                let store = &store;
                async move {
                    store
                        .bind_login(&identity, &policy, decide, LoginRecord::at(now_micros()))
                        .await
                        .expect("bind")
                }
            };
            // The one connection is open and has prepared the statement.
            login(identity("warm-up"), create.clone()).await;
            login(identity("warm-up-2"), link_required.clone()).await;
            round_trips(&snapshotter);

            // (subject, policy, outcome: None is link_required, round trips)
            let steps = [
                (
                    "583231",
                    &create,
                    Some(Outcome::UserCreated),
                    2,
                    "a first login",
                ),
                (
                    "583231",
                    &create,
                    Some(Outcome::SignedIn),
                    1,
                    "a returning login",
                ),
                ("1", &link_required, None, 1, "a login the app must link"),
                (
                    "583231",
                    &link_required,
                    Some(Outcome::SignedIn),
                    1,
                    "a bound login, link_required",
                ),
            ];
            for (subject, policy, outcome, trips, what) in steps {
                let result = login(identity(subject), policy.clone()).await;
                let got = match result {
                    BindResult::Bound { outcome, .. } => Some(outcome),
                    BindResult::LinkRequired => None,
                };
                assert_eq!(got, outcome, "{what}");
                assert_eq!(round_trips(&snapshotter), trips, "{what}");
            }
        })
    });
}
