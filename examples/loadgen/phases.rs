//! Where a full login's time goes. The library times its own phases with
//! `metrics` histograms; the load generator installs metrics-util's
//! `DebuggingRecorder`, whose snapshot drains every histogram, so one
//! snapshot before and one after a measured run give exactly that run.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use metrics_util::debugging::{DebugValue, Snapshotter};

use crate::{calls::Scenario, runner::Tally};

/// Recorded by `login.rs` with label `phase` ∈ {state, exchange, identity, store}.
const LOGIN_PHASE: &str = "authbroker_login_phase_seconds";
/// Recorded by the provider engine around each HTTP call, label `step`.
const PROVIDER_REQUEST: &str = "authbroker_provider_request_seconds";

/// Count, mean and median of one series, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stat {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
}

impl Stat {
    fn of_seconds(mut values: Vec<f64>) -> Stat {
        if values.is_empty() {
            return Stat::default();
        }
        values.sort_by(f64::total_cmp);
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        // Nearest rank, as hdrhistogram reports the client-side medians.
        let median = values[values.len().div_ceil(2) - 1];
        Stat {
            count: values.len() as u64,
            mean_us: mean * 1e6,
            p50_us: median * 1e6,
        }
    }

    fn of_histogram(h: &Histogram<u64>) -> Stat {
        Stat {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5) as f64,
        }
    }
}

/// The server's timings of one run: login phases and provider HTTP calls.
#[derive(Debug, Default)]
pub struct ServerTimings {
    /// The store's round trips since the previous call (the recorder's
    /// snapshot drains counters too).
    pub round_trips: u64,
    /// By `phase`.
    pub login: BTreeMap<String, Stat>,
    /// By provider `step` (`token`, `userinfo`, …).
    pub provider: BTreeMap<String, Stat>,
}

impl ServerTimings {
    pub fn phase(&self, name: &str) -> Stat {
        self.login.get(name).copied().unwrap_or_default()
    }
}

/// Drains the recorder: everything recorded since the previous call.
pub fn take(snapshotter: &Snapshotter) -> ServerTimings {
    let mut login: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut provider: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut round_trips = 0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let values = match value {
            DebugValue::Histogram(values) => values,
            DebugValue::Counter(n) if key.name() == authbroker::store::ROUND_TRIPS => {
                round_trips += n;
                continue;
            }
            _ => continue,
        };
        let (series, label) = match key.name() {
            LOGIN_PHASE => (&mut login, "phase"),
            PROVIDER_REQUEST => (&mut provider, "step"),
            _ => continue,
        };
        let Some(label) = key.labels().find(|l| l.key() == label) else {
            continue;
        };
        // Several keys can share a label value (e.g. other providers): merge.
        series
            .entry(label.value().to_string())
            .or_default()
            .extend(values.iter().map(|v| v.0));
    }
    let summarize = |m: BTreeMap<String, Vec<f64>>| {
        m.into_iter()
            .map(|(k, v)| (k, Stat::of_seconds(v)))
            .collect()
    };
    ServerTimings {
        round_trips,
        login: summarize(login),
        provider: summarize(provider),
    }
}

/// One full-login run: client-side parts and the server's phases.
#[derive(Debug)]
pub struct Breakdown {
    pub scenario: Scenario,
    pub concurrency: usize,
    pub total: Stat,
    pub begin: Stat,
    pub browser: Stat,
    pub complete: Stat,
    pub server: ServerTimings,
}

impl Breakdown {
    pub fn new(
        scenario: Scenario,
        concurrency: usize,
        tally: &Tally,
        server: ServerTimings,
    ) -> Breakdown {
        Breakdown {
            scenario,
            concurrency,
            total: Stat::of_histogram(&tally.total),
            begin: Stat::of_histogram(&tally.begin),
            browser: Stat::of_histogram(&tally.browser),
            complete: Stat::of_histogram(&tally.complete),
            server,
        }
    }

    /// CompleteLogin as the client saw it minus the four timed server
    /// phases: gRPC framing, auth, routing, our glue, and queueing for a
    /// core. Means only: medians of a difference cannot be derived.
    pub fn own_code_and_grpc_us(&self) -> f64 {
        let phases: f64 = ["state", "exchange", "identity", "store"]
            .iter()
            .map(|p| self.server.phase(p).mean_us)
            .sum();
        self.complete.mean_us - phases
    }
}

#[cfg(test)]
mod tests {
    use super::Stat;

    #[test]
    fn median_and_mean() {
        let s = Stat::of_seconds(vec![0.003, 0.001, 0.002, 0.010]);
        assert_eq!(s.count, 4);
        assert!((s.mean_us - 4000.0).abs() < 1e-6);
        assert!((s.p50_us - 2000.0).abs() < 1e-6);
        assert_eq!(Stat::of_seconds(vec![]).count, 0);
    }
}
