//! What the numbers were measured on. Read from /proc and /etc so the header
//! of every run says it, rather than a README that may have drifted.

use std::fs;

pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub os: String,
}

/// The commit the library was built from, and whether the tree was dirty:
/// other people edit the crate while benchmarks run.
pub fn source_revision() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown (not a git checkout)".into();
    };
    let changed =
        git(&["status", "--porcelain", "--untracked-files=no"]).map_or(0, |s| s.lines().count());
    format!(
        "git {} with {changed} modified tracked files at run time",
        head.trim()
    )
}

/// 1-, 5- and 15-minute load averages: anything else running on the machine
/// (a build, a test suite) shows here and skews the figures.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

pub fn describe() -> Machine {
    Machine {
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        cpu_model: cpu_model().unwrap_or_else(|| "unknown".into()),
        memory_gib: memory_kib().map_or(0.0, |kib| kib as f64 / (1024.0 * 1024.0)),
        os: os_name().unwrap_or_else(|| std::env::consts::OS.into()),
    }
}

fn cpu_model() -> Option<String> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn memory_kib() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `PRETTY_NAME` from os-release plus the kernel release.
fn os_name() -> Option<String> {
    let release = fs::read_to_string("/etc/os-release").ok()?;
    let pretty = release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))?
        .trim_matches('"')
        .to_string();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Some(format!("{pretty}, Linux {}", kernel.trim()))
}
