//! What a call costs besides its latency: the server's own CPU (the threads
//! of its runtime, which `main` names `SERVER_THREAD`; the sandbox runs on
//! `PROVIDER_THREAD`s and the callers on the main runtime, so neither is
//! counted), the CPU of the benchmark database's Postgres backends, the
//! store's round trips (`authbroker::store::ROUND_TRIPS`) and the sockets to
//! the sandbox, which show whether the provider HTTP client reuses its
//! connections.
//!
//! CPU time is read from `/proc/…/schedstat` (nanoseconds on a CPU), not from
//! `stat`'s 10 ms ticks: a level of a few thousand logins needs better.

use std::collections::HashMap;

use anyhow::Context;

/// Thread name of the app's runtime (workers and blocking threads).
pub const SERVER_THREAD: &str = "ab-server";
/// Thread name of the runtime the sandbox provider serves on.
pub const PROVIDER_THREAD: &str = "ab-provider";

/// Cumulative figures at one instant.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub server_ns: u64,
    /// By backend pid: a backend that starts mid-level counts from zero.
    pub postgres_ns: HashMap<i32, u64>,
    /// Since the previous sample: the recorder drains its counters.
    pub round_trips: u64,
    /// (allocations, bytes) on the server's threads, with `--count-allocs`.
    pub allocs: Option<(u64, u64)>,
}

/// One level's cost per successful call.
#[derive(Clone, Copy, Debug, Default)]
pub struct PerCall {
    pub server_us: f64,
    /// `None` on SQLite.
    pub postgres_us: Option<f64>,
    pub round_trips: Option<f64>,
    /// Heap allocations and bytes asked for on the server's threads, with
    /// `--count-allocs`.
    pub allocs: Option<(f64, f64)>,
    /// Sockets to the sandbox at the end of the level: established (counted
    /// on the sandbox's side) and in TIME_WAIT (either side). TIME_WAIT
    /// growing with the logins means connections are not reused.
    pub sandbox_established: usize,
    pub sandbox_time_wait: usize,
}

impl PerCall {
    pub fn between(
        before: &Sample,
        after: &Sample,
        calls: u64,
        postgres: bool,
        sandbox_port: Option<u16>,
    ) -> PerCall {
        let per = |total: f64| total / calls.max(1) as f64;
        let pg_ns: u64 = after
            .postgres_ns
            .iter()
            .map(|(pid, ns)| ns.saturating_sub(before.postgres_ns.get(pid).copied().unwrap_or(0)))
            .sum();
        let (established, time_wait) = sandbox_port.map_or((0, 0), sandbox_sockets);
        PerCall {
            server_us: per(after.server_ns.saturating_sub(before.server_ns) as f64 / 1e3),
            postgres_us: postgres.then(|| per(pg_ns as f64 / 1e3)),
            round_trips: postgres.then(|| per(after.round_trips as f64)),
            allocs: before.allocs.zip(after.allocs).map(|((n0, b0), (n1, b1))| {
                (
                    per(n1.saturating_sub(n0) as f64),
                    per(b1.saturating_sub(b0) as f64),
                )
            }),
            sandbox_established: established,
            sandbox_time_wait: time_wait,
        }
    }
}

/// Nanoseconds on a CPU of every thread of this process named `name`.
pub fn threads_ns(name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == name)
        })
        .filter_map(|task| schedstat_ns(&task.path().join("schedstat")))
        .sum()
}

fn schedstat_ns(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The benchmark database's client backends, found by name.
pub struct Backends {
    client: tokio_postgres::Client,
    database: String,
}

impl Backends {
    pub fn new(client: tokio_postgres::Client, database: String) -> Backends {
        Backends { client, database }
    }

    /// CPU so far of each backend connected to the benchmark database (the
    /// app's pool; not autovacuum, not this monitoring session).
    pub async fn cpu_ns(&self) -> anyhow::Result<HashMap<i32, u64>> {
        let rows = self
            .client
            .query(
                "SELECT pid FROM pg_stat_activity \
                 WHERE datname = $1 AND backend_type = 'client backend'",
                &[&self.database],
            )
            .await
            .context("listing the benchmark database's backends")?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let pid: i32 = row.get(0);
                schedstat_ns(std::path::Path::new(&format!("/proc/{pid}/schedstat")))
                    .map(|ns| (pid, ns))
            })
            .collect())
    }
}

/// (established on the sandbox's side, TIME_WAIT on either side) for TCP
/// sockets on loopback `port`, from /proc/net/tcp{,6}.
fn sandbox_sockets(port: u16) -> (usize, usize) {
    let hex = format!(":{port:04X}");
    let (mut established, mut time_wait) = (0, 0);
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, local, remote, state, ..] = fields[..] else {
                continue;
            };
            match state {
                "01" if local.ends_with(&hex) => established += 1,
                "06" if local.ends_with(&hex) || remote.ends_with(&hex) => time_wait += 1,
                _ => {}
            }
        }
    }
    (established, time_wait)
}

/// Where a level's samples come from.
pub struct Probe {
    /// `None` on SQLite.
    pub backends: Option<Backends>,
    pub sandbox_port: Option<u16>,
}

impl Probe {
    /// Now, with the round trips the recorder counted since the last sample.
    pub async fn sample(&self, round_trips: u64) -> anyhow::Result<Sample> {
        let postgres_ns = match &self.backends {
            Some(b) => b.cpu_ns().await?,
            None => HashMap::new(),
        };
        Ok(Sample {
            server_ns: threads_ns(SERVER_THREAD),
            postgres_ns,
            round_trips,
            allocs: crate::allocs::totals(),
        })
    }

    pub fn per_call(&self, before: &Sample, after: &Sample, calls: u64) -> PerCall {
        PerCall::between(
            before,
            after,
            calls,
            self.backends.is_some(),
            self.sandbox_port,
        )
    }
}
