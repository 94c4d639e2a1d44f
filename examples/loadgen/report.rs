//! Everything the load generator prints on stdout: the header, the tables,
//! the ratios and the target verdicts. Progress goes to stderr.

use crate::{
    calls::Scenario,
    machine::Machine,
    memory::MemoryReport,
    phases::{Breakdown, Stat},
    runner::{Interleaved, Row},
    state_backend::Backend,
};

/// BeginLogin's throughput target: a share of the Health/Check floor at
/// `TARGET_CONCURRENCY`, which depends on the state backend.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub backend: Backend,
    pub ratio: f64,
}

impl Target {
    pub fn of(backend: Backend) -> Target {
        Target {
            backend,
            ratio: backend.begin_target(),
        }
    }
}

/// The concurrency the BeginLogin target is judged at.
pub const TARGET_CONCURRENCY: usize = 64;
/// Resident bytes per pending login, measured with a million held.
const MEMORY_TARGET_BYTES: f64 = 1024.0;

fn ms(us: f64) -> f64 {
    us / 1000.0
}

pub fn header(machine: &Machine, run: &str, state: &str) {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    println!("authbroker loadgen {} — {now}", env!("CARGO_PKG_VERSION"));
    println!(
        "machine: {} cores (nproc), {}, {:.1} GiB RAM, {}",
        machine.cores, machine.cpu_model, machine.memory_gib, machine.os
    );
    println!(
        "note: callers, server and sandbox run in this one process, each on a Tokio runtime \
         of its own ({} worker threads each), and share these {} cores with Postgres",
        machine.cores, machine.cores
    );
    println!("run: {run}");
    println!("state backend: {state}");
    println!("source: {}", crate::machine::source_revision());
    println!("load average at start: {}", crate::machine::load_average());
    println!();
}

pub fn throughput(rows: &[Row]) {
    println!("== Throughput and latency (closed loop; latency of the whole call) ==");
    println!(
        "{:<28} {:>5} {:>9} {:>7} {:>11} {:>9} {:>9}",
        "scenario", "conc", "calls", "errors", "calls/s", "p50 ms", "p99 ms"
    );
    for r in rows {
        println!(
            "{:<28} {:>5} {:>9} {:>7} {:>11.1} {:>9.3} {:>9.3}",
            r.scenario.name(),
            r.concurrency,
            r.ok,
            r.errors,
            r.throughput(),
            ms(r.p50_us as f64),
            ms(r.p99_us as f64)
        );
    }
    println!("(calls = successful calls in the window; calls/s = calls / window)");
    for r in rows.iter().filter(|r| r.errors + r.warmup_errors > 0) {
        println!(
            "ERRORS in {} @ {}: {} measured, {} in warm-up; first ones:",
            r.scenario.name(),
            r.concurrency,
            r.errors,
            r.warmup_errors
        );
        for e in &r.first_errors {
            println!("  {e}");
        }
    }
    println!();
}

/// What each call cost: the server's threads, the Postgres backends, the
/// store's round trips; and the sockets to the sandbox.
pub fn costs(rows: &[Row]) {
    println!(
        "== Cost per successful call (server = the app's runtime threads only; the sandbox and \
         the callers run on threads of their own) =="
    );
    println!(
        "{:<28} {:>5} {:>12} {:>13} {:>12} {:>17} {:>17}",
        "scenario",
        "conc",
        "server µs",
        "postgres µs",
        "round trips",
        "sandbox est / tw",
        "allocs / KiB"
    );
    let opt = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "—".to_string(), |v| format!("{v:.digits$}"))
    };
    for r in rows {
        println!(
            "{:<28} {:>5} {:>12.1} {:>13} {:>12} {:>17} {:>17}",
            r.scenario.name(),
            r.concurrency,
            r.cost.server_us,
            opt(r.cost.postgres_us, 1),
            opt(r.cost.round_trips, 2),
            format!(
                "{} / {}",
                r.cost.sandbox_established, r.cost.sandbox_time_wait
            ),
            r.cost.allocs.map_or_else(
                || "—".to_string(),
                |(n, bytes)| format!("{n:.0} / {:.1}", bytes / 1024.0)
            ),
        );
    }
    println!(
        "(postgres µs: CPU of the benchmark database's client backends, from /proc/PID/schedstat; \
         round trips: flushes of the store's Postgres connections; sandbox est / tw: sockets to \
         the sandbox established / in TIME_WAIT after the level — a TIME_WAIT count far below the \
         logins means the HTTP clients reuse their connections; allocs / KiB: heap allocations \
         and KiB asked for on the server's threads per call, with --count-allocs)"
    );
    println!();
}

fn find(rows: &[Row], scenario: Scenario, concurrency: usize) -> Option<&Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.concurrency == concurrency)
}

/// `scenario` throughput over Health/Check's at the same concurrency.
fn ratio(rows: &[Row], scenario: Scenario, concurrency: usize) -> Option<f64> {
    let floor = find(rows, Scenario::Health, concurrency)?.throughput();
    let it = find(rows, scenario, concurrency)?.throughput();
    (floor > 0.0).then(|| it / floor)
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".into(), |r| format!("{r:.3}"))
}

pub fn ratios(rows: &[Row], levels: &[usize]) {
    println!("== Throughput ratios (scenario / Health/Check at the same concurrency) ==");
    println!(
        "{:>5} {:>18} {:>22} {:>28}",
        "conc", "BeginLogin/Health", "new-user login/Health", "returning-user login/Health"
    );
    for &c in levels {
        println!(
            "{:>5} {:>18} {:>22} {:>28}",
            c,
            fmt_ratio(ratio(rows, Scenario::BeginLogin, c)),
            fmt_ratio(ratio(rows, Scenario::NewUser, c)),
            fmt_ratio(ratio(rows, Scenario::ReturningUser, c)),
        );
    }
    println!();
}

pub fn breakdowns(all: &[Breakdown]) {
    for b in all {
        breakdown(b);
    }
}

fn line(part: &str, mean_us: f64, p50_us: Option<f64>, total_us: f64) {
    let p50 = p50_us.map_or_else(|| "—".to_string(), |p| format!("{:.3}", ms(p)));
    let share = if total_us > 0.0 {
        100.0 * mean_us / total_us
    } else {
        0.0
    };
    println!(
        "{:<52} {:>9.3} {:>9} {:>7.1}%",
        part,
        ms(mean_us),
        p50,
        share
    );
}

fn stat_line(part: &str, s: Stat, total_us: f64) {
    line(part, s.mean_us, Some(s.p50_us), total_us);
}

fn breakdown(b: &Breakdown) {
    let total = b.total.mean_us;
    let phase = |name| b.server.phase(name);
    println!(
        "== Where a full login's time goes: {} @ {} concurrent ({} logins) ==",
        b.scenario.name(),
        b.concurrency,
        b.total.count
    );
    println!(
        "{:<52} {:>9} {:>9} {:>8}",
        "part", "mean ms", "p50 ms", "share"
    );
    stat_line("BeginLogin RPC (client)", b.begin, total);
    stat_line(
        "browser step: sandbox authorize GET (client)",
        b.browser,
        total,
    );
    stat_line("CompleteLogin RPC (client), of which:", b.complete, total);
    stat_line("  state claim (server)", phase("state"), total);
    let provider = phase("exchange").mean_us + phase("identity").mean_us;
    line(
        "  provider calls: exchange + identity (server)",
        provider,
        None,
        total,
    );
    stat_line("    exchange (server)", phase("exchange"), total);
    provider_steps(b, |step| step == "token", total);
    stat_line("    identity (server)", phase("identity"), total);
    provider_steps(b, |step| step != "token", total);
    stat_line("  store: bind in Postgres (server)", phase("store"), total);
    line(
        "  state finish + own code + gRPC (the remainder)",
        b.own_code_and_grpc_us(),
        None,
        total,
    );
    let glue = total - b.begin.mean_us - b.browser.mean_us - b.complete.mean_us;
    line(
        "client glue (end-to-end − the 3 client parts)",
        glue,
        None,
        total,
    );
    stat_line("end-to-end (client)", b.total, total);
    let counts: Vec<String> = ["state", "exchange", "identity", "store"]
        .iter()
        .map(|p| format!("{p} {}", phase(p).count))
        .collect();
    println!(
        "server samples: {} (successful logins: {}); shares are of the end-to-end mean",
        counts.join(", "),
        b.total.count
    );
    println!();
}

/// The provider engine's own timing of each HTTP request, under its phase.
fn provider_steps(b: &Breakdown, include: impl Fn(&str) -> bool, total: f64) {
    for (step, s) in b.server.provider.iter().filter(|(k, _)| include(k)) {
        stat_line(&format!("      of which HTTP {step} (server)"), *s, total);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn memory(m: &MemoryReport) {
    println!("== Memory per pending login ==");
    println!(
        "method: LoginService::begin(sandbox) × {} in-process on a fresh app, before any gRPC \
         traffic; then run_pending_tasks; RSS = resident pages from /proc/self/statm × page size \
         {} ({}); allocator: mimalloc, as in the binary",
        m.requested,
        m.page_size,
        if m.page_size_assumed {
            "assumed"
        } else {
            "sysconf"
        }
    );
    println!("entries held (state_store().len()): {}", m.entries);
    println!(
        "RSS before the app: {:.1} MiB; app built with max_pending = {} (its state store's \
         index is sized then): +{:.1} MiB; with them held: {:.1} MiB; delta from before the app: \
         {:.1} MiB",
        mib(m.rss_start),
        m.requested,
        m.startup() as f64 / (1024.0 * 1024.0),
        mib(m.rss_held),
        m.delta() as f64 / (1024.0 * 1024.0)
    );
    println!(
        "bytes per pending login: {:.0}, the app's start-up memory included \
         (size_of::<PendingLogin>() = {} B; the rest is the Arc, the cache's per-entry \
         bookkeeping and index, and allocator overhead)",
        m.bytes_per_login(),
        m.pending_login_size
    );
    let trimmed = format!("{:.1} MiB", mib(m.rss_after_trim));
    println!(
        "after dropping the app: {:.1} MiB; after mi_collect(true): {trimmed} \
         (what mimalloc kept for reuse vs returned)",
        mib(m.rss_after_drop)
    );
    println!(
        "{} in-process BeginLogins took {:.2} s ({:.0}/s, one task, no gRPC)",
        m.requested,
        m.elapsed.as_secs_f64(),
        m.requested as f64 / m.elapsed.as_secs_f64()
    );
    println!();
}

pub fn verdicts(
    rows: &[Row],
    target: Target,
    interleaved: Option<&Interleaved>,
    memory: Option<&MemoryReport>,
) {
    println!("== Targets ==");
    println!(
        "BeginLogin throughput >= {} x Health/Check at {TARGET_CONCURRENCY} concurrent calls \
         ({} backend): {}",
        target.ratio,
        target.backend.name(),
        match interleaved {
            Some(c) => interleaved_verdict(c, target.ratio),
            None => format!(
                "{} [from the back-to-back levels only: no interleaved rounds ran \
                 (--ab-rounds 0, or --scenarios without both health and begin)]",
                levels_verdict(rows, target.ratio)
            ),
        }
    );
    if interleaved.is_some() {
        println!(
            "  back-to-back levels in the table, for comparison: {}",
            levels_verdict(rows, target.ratio)
        );
    }
    let not_measured = || match target.backend {
        Backend::Memory => "NOT MEASURED (--skip-memory)".to_string(),
        shared => format!(
            "NOT APPLICABLE (the {} backend holds pending logins on its server, not in \
             this process)",
            shared.name()
        ),
    };
    println!(
        "memory per pending login <= {MEMORY_TARGET_BYTES:.0} B (RSS delta with 1,000,000 \
         held): {}",
        memory.map_or_else(not_measured, memory_verdict)
    );
    println!("load average at end: {}", crate::machine::load_average());
    let errors: u64 = rows.iter().map(|r| r.errors + r.warmup_errors).sum();
    if errors > 0 {
        println!("RUN HAD ERRORS: {errors} failed calls (see above); figures are not clean");
    } else {
        println!("errors: none");
    }
}

fn pass_fail(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

fn errors_note(errors: u64) -> String {
    if errors > 0 {
        format!("; {errors} errors")
    } else {
        String::new()
    }
}

/// The ratio from the two levels of the table, measured back to back.
fn levels_verdict(rows: &[Row], target: f64) -> String {
    let c = TARGET_CONCURRENCY;
    let (Some(floor), Some(begin)) = (
        find(rows, Scenario::Health, c),
        find(rows, Scenario::BeginLogin, c),
    ) else {
        return format!(
            "NOT MEASURED (needs both health and begin in --scenarios and {c} in --concurrency)"
        );
    };
    let failed = floor.errors + begin.errors;
    let r = begin.throughput() / floor.throughput().max(f64::MIN_POSITIVE);
    format!(
        "{} (ratio {r:.3}: {:.0} vs {:.0} calls/s{})",
        pass_fail(failed == 0 && r >= target),
        begin.throughput(),
        floor.throughput(),
        errors_note(failed)
    )
}

/// The verdict, from the interleaved rounds. Two back-to-back windows of
/// several seconds on a shared 2-core VM differ by more than the effect
/// being measured; each round instead compares adjacent one-second slices,
/// and the interval over many rounds says how sure the result is. PASS
/// needs the whole interval at or above the target, FAIL the whole of it
/// below; anything between is INCONCLUSIVE, not a pass.
fn interleaved_verdict(c: &Interleaved, target: f64) -> String {
    let (health, begin) = c.totals();
    let pooled = c.ratio();
    let (lo, median, hi) = c.spread();
    let rounds: Vec<String> = c
        .rounds
        .iter()
        .map(|(h, b)| format!("{b:.0}/{h:.0}"))
        .collect();
    let (verdict, interval) = match c.interval() {
        Some((low, typical, high)) => {
            let verdict = if c.errors > 0 || high < target {
                "FAIL"
            } else if low >= target {
                "PASS"
            } else {
                "INCONCLUSIVE"
            };
            (
                verdict,
                format!("typical round {typical:.3}, 95 % interval {low:.3}..{high:.3}"),
            )
        }
        None => ("INCONCLUSIVE", "too few rounds for an interval".to_string()),
    };
    format!(
        "{verdict} ({interval}; pooled {pooled:.3}: {begin:.0} vs {health:.0} calls/s over {} \
         interleaved rounds of {:.1} s slices, order A-B, B-A, …; per round min {lo:.3}, \
         median {median:.3}, max {hi:.3}; BeginLogin/Health calls/s per round: {}{})",
        c.rounds.len(),
        c.slice.as_secs_f64(),
        rounds.join(", "),
        errors_note(c.errors)
    )
}

fn memory_verdict(m: &MemoryReport) -> String {
    let per = m.bytes_per_login();
    let all_held = m.entries >= m.requested;
    let pass = all_held && per <= MEMORY_TARGET_BYTES;
    let mut note = String::new();
    if !all_held {
        note.push_str(&format!("; only {} of {} held", m.entries, m.requested));
    }
    if m.requested != 1_000_000 {
        note.push_str(&format!("; measured with {} (--pending)", m.requested));
    }
    format!("{} ({per:.0} B per pending login{note})", pass_fail(pass))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn steady(ratio: f64) -> Interleaved {
        Interleaved {
            rounds: (0..8)
                .map(|i| (1000.0, 1000.0 * ratio * (1.0 + 0.02 * (f64::from(i) - 3.5))))
                .collect(),
            slice: Duration::from_secs(1),
            errors: 0,
            first_errors: Vec::new(),
        }
    }

    #[test]
    fn each_backend_is_judged_on_its_own_target() {
        let rounds = steady(0.6);
        let judge = |backend| interleaved_verdict(&rounds, Target::of(backend).ratio);
        assert!(judge(Backend::Redis).starts_with("PASS"));
        assert!(judge(Backend::Postgres).starts_with("PASS"));
        assert!(judge(Backend::Memory).starts_with("FAIL"));
        assert!(interleaved_verdict(&rounds, 0.6).starts_with("INCONCLUSIVE"));
    }
}
