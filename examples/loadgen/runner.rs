//! N concurrent callers, each calling back to back until a deadline: a
//! closed-loop load, so throughput is what the machine sustains with N calls
//! in flight. Each caller keeps its own histograms (no shared lock on the hot
//! path); they are merged when the level ends.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use metrics_util::debugging::Snapshotter;

use crate::{
    calls::{Caller, LoginTimes, Scenario, Shared},
    cpu::{PerCall, Probe},
    phases::{self, Breakdown},
};

/// Failures printed per level; the rest are only counted.
const ERRORS_KEPT: usize = 5;
/// Histogram range in microseconds: 1 µs to 60 s, 3 significant digits.
const MAX_MICROS: u64 = 60_000_000;

#[derive(Clone, Copy, Debug)]
pub struct Level {
    pub scenario: Scenario,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

/// One line of the throughput table.
#[derive(Debug)]
pub struct Row {
    pub scenario: Scenario,
    pub concurrency: usize,
    pub ok: u64,
    pub errors: u64,
    pub warmup_errors: u64,
    pub elapsed: Duration,
    pub p50_us: u64,
    pub p99_us: u64,
    pub first_errors: Vec<String>,
    /// CPU, round trips and sandbox sockets per successful call.
    pub cost: PerCall,
}

impl Row {
    /// Successful calls per second over the measured window.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

pub struct Measured {
    pub row: Row,
    pub breakdown: Option<Breakdown>,
}

/// Microsecond latency histograms of one caller, or of a whole level.
pub struct Tally {
    pub ok: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    /// Whole call (for a full login: Begin + browser + Complete).
    pub total: Histogram<u64>,
    pub begin: Histogram<u64>,
    pub browser: Histogram<u64>,
    pub complete: Histogram<u64>,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).context("histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Tally {
    fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            ok: 0,
            errors: 0,
            first_errors: Vec::new(),
            total: histogram()?,
            begin: histogram()?,
            browser: histogram()?,
            complete: histogram()?,
        })
    }

    fn record(&mut self, took: Duration, outcome: Result<Option<LoginTimes>, String>) {
        match outcome {
            Ok(parts) => {
                self.ok += 1;
                self.total.saturating_record(micros(took));
                if let Some(p) = parts {
                    self.begin.saturating_record(micros(p.begin));
                    self.browser.saturating_record(micros(p.browser));
                    self.complete.saturating_record(micros(p.complete));
                }
            }
            Err(e) => {
                self.errors += 1;
                if self.first_errors.len() < ERRORS_KEPT {
                    self.first_errors.push(e);
                }
            }
        }
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.ok += other.ok;
        self.errors += other.errors;
        let room = ERRORS_KEPT.saturating_sub(self.first_errors.len());
        self.first_errors
            .extend(other.first_errors.into_iter().take(room));
        self.total.add(&other.total).context("merging histograms")?;
        self.begin.add(&other.begin).context("merging histograms")?;
        self.browser
            .add(&other.browser)
            .context("merging histograms")?;
        self.complete
            .add(&other.complete)
            .context("merging histograms")?;
        Ok(())
    }
}

/// Warm-up, then the measured run; for full logins, the server's phase
/// timings of exactly the measured run (the recorder is drained before it).
pub async fn measure(
    shared: &Arc<Shared>,
    level: Level,
    snapshotter: &Snapshotter,
    probe: &Probe,
) -> anyhow::Result<Measured> {
    let (warm, _) = run_for(shared, level.scenario, level.concurrency, level.warmup).await?;
    for e in &warm.first_errors {
        eprintln!("  warm-up error: {e}");
    }
    // Every warm-up call has finished, so this drains exactly their samples.
    let before = probe.sample(phases::take(snapshotter).round_trips).await?;
    let (tally, elapsed) =
        run_for(shared, level.scenario, level.concurrency, level.duration).await?;
    let server = phases::take(snapshotter);
    let after = probe.sample(server.round_trips).await?;
    let cost = probe.per_call(&before, &after, tally.ok);
    let breakdown = level
        .scenario
        .is_full_login()
        .then(|| Breakdown::new(level.scenario, level.concurrency, &tally, server));
    for e in &tally.first_errors {
        eprintln!("  error: {e}");
    }
    let row = Row {
        scenario: level.scenario,
        concurrency: level.concurrency,
        ok: tally.ok,
        errors: tally.errors,
        warmup_errors: warm.errors,
        elapsed,
        p50_us: tally.total.value_at_quantile(0.50),
        p99_us: tally.total.value_at_quantile(0.99),
        first_errors: tally.first_errors,
        cost,
    };
    Ok(Measured { row, breakdown })
}

/// Throughput of two scenarios measured in alternating slices.
pub struct Interleaved {
    /// Per round: (first scenario's calls/s, second's).
    pub rounds: Vec<(f64, f64)>,
    /// How long each scenario ran in each round.
    pub slice: Duration,
    pub errors: u64,
    pub first_errors: Vec<String>,
}

impl Interleaved {
    /// Mean calls/s of (first, second) over all rounds.
    pub fn totals(&self) -> (f64, f64) {
        let n = self.rounds.len().max(1) as f64;
        let (a, b) = self
            .rounds
            .iter()
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
        (a / n, b / n)
    }

    /// Second over first, over all rounds together.
    pub fn ratio(&self) -> f64 {
        let (a, b) = self.totals();
        second_over_first(a, b)
    }

    /// Each round's second-over-first ratio, in round order.
    fn round_ratios(&self) -> impl Iterator<Item = f64> + '_ {
        self.rounds.iter().map(|&(a, b)| second_over_first(a, b))
    }

    /// A one-sided 95 % confidence interval for the typical per-round ratio
    /// (the geometric mean): Student's t over the rounds' log ratios. The
    /// rounds are paired (each compares adjacent slices), so what is left
    /// of the machine's drift is the round-to-round scatter this measures.
    /// `None` with fewer than two rounds.
    pub fn interval(&self) -> Option<(f64, f64, f64)> {
        let logs: Vec<f64> = self.round_ratios().map(f64::ln).collect();
        let n = logs.len();
        if n < 2 {
            return None;
        }
        let mean = logs.iter().sum::<f64>() / n as f64;
        let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let half = t_95(n - 1) * (var / n as f64).sqrt();
        Some(((mean - half).exp(), mean.exp(), (mean + half).exp()))
    }

    /// Smallest, median and largest per-round ratio.
    pub fn spread(&self) -> (f64, f64, f64) {
        let mut ratios: Vec<f64> = self.round_ratios().collect();
        ratios.sort_by(f64::total_cmp);
        let at = |i: usize| ratios.get(i).copied().unwrap_or(f64::NAN);
        let median = match ratios.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => at(n / 2),
            n => (at(n / 2 - 1) + at(n / 2)) / 2.0,
        };
        (at(0), median, at(ratios.len().saturating_sub(1)))
    }
}

/// `first` and `second` at `concurrency` in `rounds` A-B-B-A slices: the
/// machine is shared, and a build starting mid-run skews two back-to-back
/// windows but hits interleaved slices alike.
pub async fn interleaved(
    shared: &Arc<Shared>,
    (first, second): (Scenario, Scenario),
    concurrency: usize,
    slice: Duration,
    rounds: usize,
) -> anyhow::Result<Interleaved> {
    let mut result = Interleaved {
        rounds: Vec::with_capacity(rounds),
        slice,
        errors: 0,
        first_errors: Vec::new(),
    };
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [first, second]
        } else {
            [second, first]
        };
        let mut throughput = [0.0; 2];
        for scenario in order {
            let (tally, elapsed) = run_for(shared, scenario, concurrency, slice).await?;
            result.errors += tally.errors;
            result.first_errors.extend(tally.first_errors);
            result.first_errors.truncate(ERRORS_KEPT);
            throughput[usize::from(scenario == second)] = tally.ok as f64 / elapsed.as_secs_f64();
        }
        result.rounds.push((throughput[0], throughput[1]));
    }
    Ok(result)
}

/// `concurrency` callers until `duration` has passed. A call in flight at the
/// deadline is finished and counted, so the window is the time until the
/// last caller stopped, not the nominal duration.
async fn run_for(
    shared: &Arc<Shared>,
    scenario: Scenario,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(Tally, Duration)> {
    let started = Instant::now();
    let deadline = started + duration;
    let callers: Vec<_> = (0..concurrency)
        .map(|number| {
            let mut caller = Caller::new(shared, number);
            tokio::spawn(async move {
                let mut tally = Tally::new()?;
                while Instant::now() < deadline {
                    let call_started = Instant::now();
                    let outcome = caller.call(scenario).await;
                    tally.record(call_started.elapsed(), outcome);
                }
                anyhow::Ok(tally)
            })
        })
        .collect();
    let mut total = Tally::new()?;
    for caller in callers {
        total.merge(caller.await.context("a caller task failed")??)?;
    }
    Ok((total, started.elapsed()))
}

fn second_over_first(first: f64, second: f64) -> f64 {
    second / first.max(f64::MIN_POSITIVE)
}

/// Student's t, one-sided 95 %, for `df` degrees of freedom. A table: the
/// loadgen needs this and nothing else of a statistics crate.
fn t_95(df: usize) -> f64 {
    const T: [f64; 30] = [
        6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771,
        1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706,
        1.703, 1.701, 1.699, 1.697,
    ];
    // Past 30, the row of the largest tabulated df not above `df`: between
    // rows that errs towards a wider interval, never a narrower one.
    const WIDE: [(usize, f64); 5] = [
        (30, 1.697),
        (40, 1.684),
        (60, 1.671),
        (80, 1.664),
        (120, 1.658),
    ];
    match T.get(df.wrapping_sub(1)) {
        Some(t) => *t,
        None => WIDE
            .iter()
            .rev()
            .find(|(rows, _)| *rows <= df)
            .map_or(T[0], |(_, t)| *t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounds(ratios: &[f64]) -> Interleaved {
        Interleaved {
            rounds: ratios.iter().map(|r| (1000.0, 1000.0 * r)).collect(),
            slice: Duration::from_secs(1),
            errors: 0,
            first_errors: Vec::new(),
        }
    }

    #[test]
    fn interval_narrows_with_agreeing_rounds() {
        let (low, typical, high) = rounds(&[0.9; 8]).interval().unwrap();
        assert!((low - 0.9).abs() < 1e-9 && (typical - 0.9).abs() < 1e-9);
        assert!((high - 0.9).abs() < 1e-9);

        let scattered = rounds(&[0.70, 0.95, 0.80, 0.90, 0.75, 0.92]);
        let (low, typical, high) = scattered.interval().unwrap();
        assert!(low < typical && typical < high);
        assert!(low < 0.8 && high > 0.8, "{low}..{high}");
        // One round says nothing about scatter.
        assert!(rounds(&[0.9]).interval().is_none());
    }

    #[test]
    fn student_t_table() {
        assert_eq!(t_95(1), 6.314);
        assert_eq!(t_95(19), 1.729);
        assert_eq!(t_95(30), 1.697);
        assert_eq!(t_95(35), 1.697);
        assert_eq!(t_95(79), 1.671);
        assert_eq!(t_95(80), 1.664);
        assert_eq!(t_95(500), 1.658);
    }

    #[test]
    fn pooled_ratio_and_spread() {
        let c = rounds(&[0.5, 1.0, 0.75]);
        assert!((c.ratio() - 0.75).abs() < 1e-9);
        assert_eq!(c.spread(), (0.5, 0.75, 1.0));
    }
}
