//! Load generator for authbroker (DESIGN §8): one process, one run, against an
//! in-process authbroker on 127.0.0.1:0 backed by a throwaway Postgres
//! database (or SQLite with `--sqlite`), pending logins in the state backend
//! `--state-backend` names, and the built-in sandbox provider, over real
//! gRPC on a loopback socket.
//!
//!     cargo build --release --example loadgen
//!     target/release/examples/loadgen [--quick] [--duration 5s] [--database-url URL]
//!         [--state-backend memory|postgres|redis] [--state-url URL]
//!
//! Layout, one job per module:
//! - `machine`: what the numbers were measured on (cores, CPU, memory, OS).
//! - `bench_db`: creates and drops the randomly named benchmark database.
//! - `state_backend`: the app's `[state]` section, and a Redis run's cleanup.
//! - `harness`: settings, the running app, its gRPC channels.
//! - `calls`: one call of each scenario, and how a failure is described.
//! - `runner`: N concurrent callers for a fixed time; latency histograms.
//! - `allocs`: with `--count-allocs`, heap allocations on the server's
//!   threads.
//! - `cpu`: what each call cost — the server's threads, the Postgres
//!   backends, the store's round trips — and the sandbox's sockets.
//! - `phases`: the in-process metrics recorder and where a login's time goes.
//! - `memory`: RSS per pending login with a million held (memory backend).
//! - `report`: the printed tables, ratios and target verdicts.
//!
//! The modules live in `examples/loadgen/`; a crate root's `mod` looks beside
//! it, hence the `#[path]`s.

#[path = "loadgen/allocs.rs"]
mod allocs;
#[path = "loadgen/bench_db.rs"]
mod bench_db;
#[path = "loadgen/calls.rs"]
mod calls;
#[path = "loadgen/cpu.rs"]
mod cpu;
#[path = "loadgen/harness.rs"]
mod harness;
#[path = "loadgen/machine.rs"]
mod machine;
#[path = "loadgen/memory.rs"]
mod memory;
#[path = "loadgen/phases.rs"]
mod phases;
#[path = "loadgen/report.rs"]
mod report;
#[path = "loadgen/runner.rs"]
mod runner;
#[path = "loadgen/state_backend.rs"]
mod state_backend;

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use metrics_util::debugging::{DebuggingRecorder, Snapshotter};

use crate::{
    calls::{Scenario, Shared},
    cpu::Probe,
    harness::{RunningApp, Runtimes},
    phases::Breakdown,
    runner::{Interleaved, Level, Row},
    state_backend::{Backend, StateTarget},
};

/// The default server when neither `--database-url` nor `TEST_DATABASE_URL`
/// says otherwise: the conventional local Postgres.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Logins in flight while the returning users are created: enough to make
/// setup quick, not part of any measurement.
const CREATE_CONCURRENCY: usize = 64;

#[derive(Parser, Debug)]
#[command(about = "Measures authbroker: Health/Check floor, BeginLogin, full sandbox logins")]
struct Args {
    /// How long each (scenario, concurrency) level is measured, e.g. 5s, 1500ms.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    /// Unmeasured run before each level, so connections, pools and caches are warm.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    /// 1 s levels and 250 ms warm-ups: a smoke run, not for publishing.
    #[arg(long)]
    quick: bool,
    /// Scenarios to run, comma-separated (default: all four, in this order).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Scenario::ALL)]
    scenarios: Vec<Scenario>,
    /// Concurrent callers, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 64])]
    concurrency: Vec<usize>,
    /// A Postgres server URL whose user may create databases; its database,
    /// if any, is only used to CREATE and DROP the benchmark database.
    #[arg(
        long,
        env = "TEST_DATABASE_URL",
        hide_env_values = true,
        default_value = DEFAULT_DATABASE_URL
    )]
    database_url: String,
    /// Use a temporary SQLite file instead of Postgres.
    #[arg(long)]
    sqlite: bool,
    /// Where the app keeps pending logins and link tickets. The BeginLogin
    /// target depends on it: 0.8 × Health/Check for memory, 0.5 for redis,
    /// 0.2 for postgres.
    #[arg(long, value_enum, default_value_t = Backend::Memory)]
    state_backend: Backend,
    /// The state backend's server. redis: default `TEST_REDIS_URL`, else
    /// redis://127.0.0.1:6379/0; each run writes under a key prefix of its
    /// own and deletes its keys at the end. postgres: default the benchmark
    /// database (dropped at the end); a database given here keeps its
    /// `pending_states` table. memory: takes none.
    #[arg(long)]
    state_url: Option<String>,
    /// The postgres state backend's own pool size (default: the app's).
    #[arg(long)]
    state_pool_size: Option<usize>,
    /// gRPC channels (HTTP/2 connections) shared round-robin by the callers.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Users created up front for the returning-user logins.
    #[arg(long, default_value_t = 1000)]
    returning_users: usize,
    /// The app's `login.max_pending`. Every BeginLogin leaves an entry (a
    /// tombstone once used) for state_ttl + grace, so this must exceed what
    /// the whole run begins, or the run turns into a TOO_MANY_PENDING_LOGINS
    /// test (its errors are counted and printed). The state store's index is
    /// sized for it at start, as in production.
    #[arg(long, default_value_t = 8_000_000)]
    max_pending: u64,
    /// Pending logins held for the memory measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pending: u64,
    /// Rounds of interleaved Health/BeginLogin slices at 64 callers, each
    /// round one slice of each, in the order A-B, B-A, … (an odd count is
    /// rounded up so both orders are equally many). The BeginLogin target is
    /// judged on them; 0 skips them and judges on the back-to-back levels.
    /// 80: on a shared 2-core VM, 20 rounds left an interval about ±0.03
    /// wide, too wide to tell a ratio of 0.82 from 0.8.
    #[arg(long, default_value_t = 80)]
    ab_rounds: usize,
    /// Count heap allocations on the server's threads and report them per
    /// call. The counting costs CPU, so a counting run's CPU figures are
    /// not the server's: measure CPU without it.
    #[arg(long)]
    count_allocs: bool,
    /// Skip the memory measurement (only the memory backend has one).
    #[arg(long)]
    skip_memory: bool,
    /// The app's database pool size (default: the app's own default).
    #[arg(long)]
    pool_size: Option<usize>,
    /// Print the app's logs (info level) to stderr.
    #[arg(long)]
    verbose: bool,
}

impl Args {
    fn level_timing(&self) -> (Duration, Duration) {
        if self.quick {
            (Duration::from_secs(1), Duration::from_millis(250))
        } else {
            (self.duration, self.warmup)
        }
    }
}

/// `5s`, `1500ms`, `0.5s`: enough for a command line without another crate.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.strip_suffix("ms") {
        Some(n) => (n, 1e-3),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 5s or 500ms"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(value * unit))
}

/// The allocator the `authbroker` binary ships with, so the figures are the
/// binary's; it counts only with `--count-allocs`.
#[global_allocator]
static ALLOCATOR: allocs::Counting = allocs::Counting;

fn main() -> ExitCode {
    let args = Args::parse();
    if args.count_allocs {
        allocs::enable();
    }
    // Installed before anything runs so every phase timing lands in it.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    if recorder.install().is_err() {
        eprintln!("loadgen: a metrics recorder is already installed");
        return ExitCode::FAILURE;
    }
    // Three runtimes, each one worker per core as Tokio's default: the
    // callers' (this one), the app's, and the sandbox provider's. They share
    // the machine's cores, but the app's threads are its own, so their CPU
    // clocks are the server's cost.
    let runtime = |name: Option<&str>| {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all();
        if let Some(name) = name {
            // Blocking threads (SQLite's) too; kept alive, so none exits
            // between two samples and takes its CPU time with it.
            builder
                .thread_name(name)
                .thread_keep_alive(Duration::from_secs(24 * 3600));
        }
        if name == Some(cpu::SERVER_THREAD) {
            builder.on_thread_start(allocs::mark_server_thread);
        }
        builder.build()
    };
    let (callers, server, provider) = match (
        runtime(None),
        runtime(Some(cpu::SERVER_THREAD)),
        runtime(Some(cpu::PROVIDER_THREAD)),
    ) {
        (Ok(c), Ok(s), Ok(p)) => (c, s, p),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("loadgen: cannot start the Tokio runtimes: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtimes = Runtimes {
        server: server.handle().clone(),
        provider: provider.handle().clone(),
    };
    let result = callers.block_on(run(args, snapshotter, runtimes));
    // Whatever tasks are left (pool connections, the sandbox) end with them.
    server.shutdown_background();
    provider.shutdown_background();
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(errors) => {
            eprintln!("loadgen: {errors} calls failed; the figures above are not clean");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up the database, runs everything, and always drops the database
/// and deletes a Redis run's keys. Returns the number of failed calls.
async fn run(args: Args, snapshotter: Snapshotter, runtimes: Runtimes) -> anyhow::Result<u64> {
    if args.verbose {
        authbroker::telemetry::init(&Default::default());
    }
    let state = StateTarget::resolve(
        args.state_backend,
        args.state_url.clone(),
        std::env::var("TEST_REDIS_URL").ok(),
        args.state_pool_size,
        args.sqlite,
    )?;
    let (duration, warmup) = args.level_timing();
    report::header(
        &machine::describe(),
        &args_summary(&args, duration, warmup),
        &state.describe(),
    );

    let result = if args.sqlite {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        bench(&args, &state, &url, &snapshotter, &runtimes, None).await
    } else {
        let db = bench_db::BenchDatabase::create(&args.database_url).await?;
        let backends = db.backends().await?;
        let result = bench(
            &args,
            &state,
            &db.url,
            &snapshotter,
            &runtimes,
            Some(backends),
        )
        .await;
        if let Err(e) = db.drop_database().await {
            eprintln!("loadgen: warning: {e:#}");
        }
        result
    };
    if let Err(e) = state.clean_up().await {
        eprintln!("loadgen: warning: this run's Redis keys were not all deleted: {e:#}");
    }
    result
}

fn args_summary(args: &Args, duration: Duration, warmup: Duration) -> String {
    let backend = if args.sqlite {
        "SQLite (temporary file)".to_string()
    } else {
        format!(
            "Postgres at {} (throwaway database)",
            authbroker::config::redact_url(&args.database_url)
        )
    };
    format!(
        "levels {:?} concurrent callers, {:.1} s each after a {:.2} s warm-up; {} gRPC channels; \
         store: {backend}",
        args.concurrency,
        duration.as_secs_f64(),
        warmup.as_secs_f64(),
        args.channels
    )
}

/// Memory first, on a fresh heap (see `memory`), then the gRPC scenarios.
async fn bench(
    args: &Args,
    state: &StateTarget,
    database_url: &str,
    snapshotter: &Snapshotter,
    runtimes: &Runtimes,
    backends: Option<cpu::Backends>,
) -> anyhow::Result<u64> {
    let mut settings = harness::settings(database_url, args.pool_size, args.max_pending)?;
    state.apply(&mut settings);
    let memory = if args.skip_memory {
        None
    } else if state.backend != Backend::Memory {
        // Its entries live in the backend's server, not in this process;
        // `memory` reads the moka store the memory backend alone has.
        eprintln!(
            "memory: skipped, the per-login figure is the memory backend's (this run: {})",
            state.backend.name()
        );
        None
    } else {
        eprintln!("memory: holding {} pending logins …", args.pending);
        Some(memory::measure(settings.clone(), args.pending).await?)
    };

    let app = RunningApp::start(settings, args.channels, runtimes).await?;
    eprintln!("app listening on {}", app.addr);
    let probe = Probe {
        backends,
        sandbox_port: app.sandbox_port,
    };
    let outcome = grpc_scenarios(args, &app, snapshotter, &probe).await;
    app.stop().await;
    let (rows, breakdowns, interleaved) = outcome?;

    report::throughput(&rows);
    report::costs(&rows);
    report::ratios(&rows, &args.concurrency);
    report::breakdowns(&breakdowns);
    if let Some(m) = &memory {
        report::memory(m);
    }
    let target = report::Target::of(state.backend);
    report::verdicts(&rows, target, interleaved.as_ref(), memory.as_ref());
    let interleaved_errors = interleaved.as_ref().map_or(0, |c| c.errors);
    Ok(rows.iter().map(|r| r.errors + r.warmup_errors).sum::<u64>() + interleaved_errors)
}

/// Every scenario at every level, in order; pre-creates the returning users
/// just before their scenario.
async fn grpc_scenarios(
    args: &Args,
    app: &RunningApp,
    snapshotter: &Snapshotter,
    probe: &Probe,
) -> anyhow::Result<(Vec<Row>, Vec<Breakdown>, Option<Interleaved>)> {
    let (duration, warmup) = args.level_timing();
    let shared = Arc::new(Shared::new(app, args.returning_users)?);
    let (mut rows, mut breakdowns) = (Vec::new(), Vec::new());
    let mut interleaved_rounds = None;
    for &scenario in &args.scenarios {
        // The target's rounds run before any full login: those leave
        // Postgres with checkpoints and autovacuum to do on the same 2
        // cores, which would land on some slices and not others.
        if scenario.is_full_login() && interleaved_rounds.is_none() {
            interleaved_rounds = Some(interleaved(args, &shared).await?);
        }
        if scenario == Scenario::ReturningUser {
            eprintln!("creating {} returning users …", args.returning_users);
            calls::create_returning_users(&shared, CREATE_CONCURRENCY).await?;
        }
        for &concurrency in &args.concurrency {
            eprintln!("{} @ {concurrency} …", scenario.name());
            let level = Level {
                scenario,
                concurrency,
                duration,
                warmup,
            };
            let measured = runner::measure(&shared, level, snapshotter, probe).await?;
            if let Some(b) = measured.breakdown {
                breakdowns.push(b);
            }
            rows.push(measured.row);
        }
    }
    let interleaved = match interleaved_rounds {
        Some(done) => done,
        None => interleaved(args, &shared).await?,
    };
    Ok((rows, breakdowns, interleaved))
}

/// Health/Check and BeginLogin in interleaved slices: what the BeginLogin
/// target is judged on.
async fn interleaved(args: &Args, shared: &Arc<Shared>) -> anyhow::Result<Option<Interleaved>> {
    let wanted = [Scenario::Health, Scenario::BeginLogin];
    if args.ab_rounds == 0 || !wanted.iter().all(|s| args.scenarios.contains(s)) {
        return Ok(None);
    }
    let (slice, _) = args.level_timing();
    let slice = slice.min(Duration::from_secs(1));
    eprintln!(
        "Health/Check and BeginLogin @ {}, interleaved A-B-B-A …",
        report::TARGET_CONCURRENCY
    );
    let result = runner::interleaved(
        shared,
        (Scenario::Health, Scenario::BeginLogin),
        report::TARGET_CONCURRENCY,
        slice,
        args.ab_rounds.next_multiple_of(2),
    )
    .await?;
    for e in &result.first_errors {
        eprintln!("  error: {e}");
    }
    Ok(Some(result))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
