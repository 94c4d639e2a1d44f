//! Where the app under test keeps its pending logins (`--state-backend`):
//! in the process (`memory`), in a table of the benchmark database
//! (`postgres`), or on a Redis server (`redis`). A Redis run writes under a
//! key prefix of its own and deletes its keys at the end, so runs never see
//! each other's entries, nor the test suites' on the same server.

use std::time::{Duration, Instant};

use anyhow::Context;
use authbroker::config::{Settings, StateBackend, redact_url};

/// Redis when neither `--state-url` nor `TEST_REDIS_URL` says otherwise:
/// the conventional local server, as the test suites use it.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// Keys a cleanup round asks SCAN for, and deletes with one UNLINK.
const CLEANUP_BATCH: usize = 1000;
/// A Redis that stops answering does not hold the run's exit hostage.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The in-process moka store: one instance only.
    Memory,
    /// The `pending_states` table, in the benchmark database by default.
    Postgres,
    /// A Redis server: `--state-url`, else `TEST_REDIS_URL`, else the local one.
    Redis,
}

impl Backend {
    pub fn name(self) -> &'static str {
        self.config().as_str()
    }

    fn config(self) -> StateBackend {
        match self {
            Backend::Memory => StateBackend::Memory,
            Backend::Postgres => StateBackend::Postgres,
            Backend::Redis => StateBackend::Redis,
        }
    }

    /// BeginLogin's target share of Health/Check at 64 concurrent calls
    /// (issue 15, item 9): a shared backend pays a round trip per login
    /// that Health/Check does not, so its bar is lower.
    pub fn begin_target(self) -> f64 {
        match self {
            Backend::Memory => 0.8,
            Backend::Postgres => 0.2,
            Backend::Redis => 0.5,
        }
    }
}

/// The chosen backend with everything it needs resolved before the run.
#[derive(Clone, Debug)]
pub struct StateTarget {
    pub backend: Backend,
    /// `None` for memory, and for postgres on the benchmark database.
    url: Option<String>,
    /// Redis only: `authbroker-loadgen-<uuid>:`, this run's own.
    key_prefix: Option<String>,
    /// Postgres only: the backend's own pool (default: the app's default).
    pool_size: Option<usize>,
}

impl StateTarget {
    /// `url` is `--state-url`; `redis_env` is `TEST_REDIS_URL`, read by the
    /// caller so that this stays a pure function of its inputs.
    pub fn resolve(
        backend: Backend,
        url: Option<String>,
        redis_env: Option<String>,
        pool_size: Option<usize>,
        sqlite: bool,
    ) -> anyhow::Result<StateTarget> {
        let (url, key_prefix) = match backend {
            Backend::Memory => {
                if url.is_some() {
                    anyhow::bail!("--state-url: the memory backend takes no URL");
                }
                (None, None)
            }
            Backend::Postgres => {
                if url.is_none() && sqlite {
                    anyhow::bail!(
                        "--state-backend postgres with --sqlite needs --state-url \
                         (a postgres:// database for the state table)"
                    );
                }
                (url, None)
            }
            Backend::Redis => {
                let url = url
                    .or(redis_env)
                    .unwrap_or_else(|| DEFAULT_REDIS_URL.to_string());
                let prefix = format!("authbroker-loadgen-{}:", uuid::Uuid::new_v4().simple());
                (Some(url), Some(prefix))
            }
        };
        if pool_size.is_some() && backend != Backend::Postgres {
            anyhow::bail!("--state-pool-size: only the postgres backend has a pool");
        }
        Ok(StateTarget {
            backend,
            url,
            key_prefix,
            pool_size,
        })
    }

    /// Sets `[state]` in the app's settings.
    pub fn apply(&self, settings: &mut Settings) {
        settings.state.backend = self.backend.config();
        settings.state.url.clone_from(&self.url);
        if let Some(prefix) = &self.key_prefix {
            settings.state.key_prefix.clone_from(prefix);
        }
        if let Some(size) = self.pool_size {
            settings.state.pool_size = size;
        }
    }

    /// One line for the printed header.
    pub fn describe(&self) -> String {
        let pool = |size: Option<usize>| {
            size.map_or_else(
                || {
                    format!(
                        "{} connections (the default)",
                        Settings::default().state.pool_size
                    )
                },
                |s| format!("{s} connections"),
            )
        };
        match (self.backend, &self.url) {
            (Backend::Memory, _) => "memory (in-process moka store)".into(),
            (Backend::Postgres, None) => format!(
                "postgres, table pending_states in the benchmark database, own pool of {}",
                pool(self.pool_size)
            ),
            (Backend::Postgres, Some(url)) => format!(
                "postgres at {} (its pending_states table is left in place), own pool of {}",
                redact_url(url),
                pool(self.pool_size)
            ),
            (Backend::Redis, url) => format!(
                "redis at {}, key prefix {:?} (this run's own; its keys are deleted at the end)",
                redact_url(url.as_deref().unwrap_or_default()),
                self.key_prefix.as_deref().unwrap_or_default()
            ),
        }
    }

    /// Deletes this run's Redis keys: SCAN for the prefix, UNLINK each
    /// batch. Nothing to do for the other backends (the benchmark database
    /// is dropped as a whole). Returns how many keys went, if any were
    /// looked for.
    pub async fn clean_up(&self) -> anyhow::Result<Option<u64>> {
        let (Some(url), Some(prefix)) = (&self.url, &self.key_prefix) else {
            return Ok(None);
        };
        tokio::time::timeout(CLEANUP_TIMEOUT, delete_prefixed(url, prefix))
            .await
            .map_err(|_| anyhow::anyhow!("Redis cleanup took over {CLEANUP_TIMEOUT:?}"))?
            .map(Some)
    }
}

async fn delete_prefixed(url: &str, prefix: &str) -> anyhow::Result<u64> {
    // The prefix is ours (letters, digits, '-' and ':'), so it is a glob
    // pattern that matches only itself.
    debug_assert!(
        prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':')
    );
    let started = Instant::now();
    let mut redis = redis::Client::open(url)
        .with_context(|| format!("Redis URL {}", redact_url(url)))?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot reach Redis at {}", redact_url(url)))?;
    let pattern = format!("{prefix}*");
    let (mut cursor, mut deleted) = (0u64, 0u64);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(CLEANUP_BATCH)
            .query_async(&mut redis)
            .await
            .context("SCAN")?;
        if !keys.is_empty() {
            let gone: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut redis)
                .await
                .context("UNLINK")?;
            deleted += gone;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    eprintln!(
        "redis: deleted {deleted} keys under {prefix:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backend_resolves_its_url() {
        let memory = StateTarget::resolve(Backend::Memory, None, None, None, false).unwrap();
        assert!(memory.url.is_none() && memory.key_prefix.is_none());
        assert!(
            StateTarget::resolve(Backend::Memory, Some("redis://x".into()), None, None, false)
                .is_err()
        );

        let redis = StateTarget::resolve(Backend::Redis, None, None, None, false).unwrap();
        assert_eq!(redis.url.as_deref(), Some(DEFAULT_REDIS_URL));
        let env = Some("redis://env:6379/3".to_string());
        let from_env =
            StateTarget::resolve(Backend::Redis, None, env.clone(), None, false).unwrap();
        assert_eq!(from_env.url, env);
        let given = StateTarget::resolve(
            Backend::Redis,
            Some("redis://arg/1".into()),
            env,
            None,
            false,
        )
        .unwrap();
        assert_eq!(given.url.as_deref(), Some("redis://arg/1"));
        // Every run writes under a prefix of its own.
        assert_ne!(redis.key_prefix, from_env.key_prefix);
        assert!(redis.key_prefix.unwrap().starts_with("authbroker-loadgen-"));

        let postgres = StateTarget::resolve(Backend::Postgres, None, None, Some(8), false).unwrap();
        assert!(postgres.url.is_none(), "the benchmark database");
        assert!(StateTarget::resolve(Backend::Postgres, None, None, None, true).is_err());
        assert!(StateTarget::resolve(Backend::Redis, None, None, Some(8), false).is_err());
    }

    #[test]
    fn settings_get_the_state_section() {
        let target = StateTarget::resolve(Backend::Redis, None, None, None, false).unwrap();
        let mut settings = Settings::default();
        target.apply(&mut settings);
        assert_eq!(settings.state.backend, StateBackend::Redis);
        assert_eq!(settings.state.url.as_deref(), Some(DEFAULT_REDIS_URL));
        assert_eq!(Some(settings.state.key_prefix), target.key_prefix);

        let target = StateTarget::resolve(Backend::Postgres, None, None, Some(8), false).unwrap();
        let mut settings = Settings::default();
        target.apply(&mut settings);
        assert_eq!(settings.state.backend, StateBackend::Postgres);
        assert_eq!(settings.state.url, None);
        assert_eq!(settings.state.pool_size, 8);
    }

    #[test]
    fn targets_per_backend() {
        assert_eq!(Backend::Memory.begin_target(), 0.8);
        assert_eq!(Backend::Postgres.begin_target(), 0.2);
        assert_eq!(Backend::Redis.begin_target(), 0.5);
    }
}
