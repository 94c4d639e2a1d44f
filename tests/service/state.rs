//! The `StateStore` conformance suite on every backend (memory, Postgres,
//! Redis), one test per scenario and backend so a failure names both, plus
//! what only a shared backend has: an unreachable server, and what a reader
//! of its data can see.

use crate::support::db;
#[path = "state/postgres.rs"]
mod postgres;
#[path = "state/redis.rs"]
mod redis;

use std::sync::Arc;

use authbroker::state::{MemoryStateStore, StateStore, conformance};

fn memory_factory() -> conformance::Factory {
    Arc::new(|limits| {
        Box::pin(async move { Arc::new(MemoryStateStore::new(limits)) as Arc<dyn StateStore> })
    })
}

macro_rules! conformance_tests {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    conformance::$scenario(memory_factory()).await;
                }
            )*
        }

        mod on_postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let db = db::fresh_database().await;
                    conformance::$scenario(postgres::factory(&db)).await;
                }
            )*
        }

        mod on_redis {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let Some(factory) = redis::factory().await else { return };
                    conformance::$scenario(factory).await;
                }
            )*
        }

        /// The macro's list and the suite's stay the same.
        #[test]
        fn every_scenario_runs_on_every_backend() {
            let mut listed = vec![$(stringify!($scenario)),*];
            let mut suite: Vec<&str> = conformance::SCENARIOS.iter().map(|(n, _)| *n).collect();
            listed.sort_unstable();
            suite.sort_unstable();
            assert_eq!(listed, suite, "update conformance_tests! in tests/service/state.rs");
        }
    };
}

conformance_tests!(
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
