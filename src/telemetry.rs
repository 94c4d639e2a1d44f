//! Logging. Text for people, JSON for machines; `RUST_LOG` overrides the
//! configured filter. Nothing secret is ever logged: handlers log reasons and
//! cause chains, and every type holding a token, code or state redacts itself
//! in `Debug`. Libraries that would log personal data or credentials at
//! their chattier levels are held at `warn` whatever the filter says, unless
//! it names them (`QUIET_TARGETS`). Colours only on a terminal.

pub mod trace;

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt, fmt::MakeWriter, prelude::*};

use crate::config::{LogFormat, LogSettings, TracingSettings};
pub use trace::TraceExport;

/// What exported spans are filtered by, whatever the log filter: every
/// span of ours at info, none of the quiet targets' (their fields would
/// carry what their logs would).
const EXPORT_FILTER: &str = "info";

/// Targets kept at `warn` unless the filter names them: at debug
/// tokio_postgres logs every statement's parameters (emails, user ids,
/// sealed tokens); h2 and hyper log frames and headers (API keys) at trace;
/// reqwest logs the URLs it calls (authorization codes in redirects).
pub const QUIET_TARGETS: &[&str] = &["tokio_postgres", "h2", "hyper", "hyper_util", "reqwest"];

/// Installs the global subscriber. Safe to call more than once (tests): later
/// calls are ignored.
pub fn init(settings: &LogSettings) {
    let ansi = std::io::stderr().is_terminal();
    let _ = subscriber(settings, None, std::io::stderr, ansi).try_init();
}

/// `init`, with spans exported over OTLP when `[tracing]` says where to.
/// Keep the returned exporter until the process ends: dropping it sends
/// the last spans.
pub fn init_with_traces(
    log: &LogSettings,
    tracing: &TracingSettings,
) -> Result<Option<TraceExport>, trace::TraceError> {
    let export = TraceExport::start(tracing)?;
    let ansi = std::io::stderr().is_terminal();
    let _ = subscriber(log, export.as_ref(), std::io::stderr, ansi).try_init();
    Ok(export)
}

/// The subscriber `init` installs, writing to `writer`: log lines filtered
/// by `RUST_LOG` or `settings.filter`, and spans to `export` when given.
/// Tests install it for one thread with a writer they read.
pub fn subscriber<W>(
    settings: &LogSettings,
    export: Option<&TraceExport>,
    writer: W,
    ansi: bool,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .and_then(|f| EnvFilter::try_new(with_quiet_targets(&f)).ok());
    let filter = from_env
        .or_else(|| EnvFilter::try_new(with_quiet_targets(&settings.filter)).ok())
        .unwrap_or_else(|| EnvFilter::new(with_quiet_targets("info")));
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match settings.format {
        // A file or a pipe gets plain text; escape codes are for terminals.
        LogFormat::Text => fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    let spans = export.map(|export| {
        tracing_opentelemetry::layer()
            .with_tracer(export.tracer())
            .with_filter(EnvFilter::new(with_quiet_targets(EXPORT_FILTER)))
    });
    tracing_subscriber::registry().with(logs).with(spans)
}

/// `filter` (EnvFilter syntax), then `TARGET=warn` for every quiet target it
/// does not name itself. A target directive is more specific than a bare
/// level, so `debug` alone leaves them at `warn`; `tokio_postgres=debug`
/// (or a directive for one of its modules) is the way to hear them.
pub fn with_quiet_targets(filter: &str) -> String {
    let named: Vec<&str> = filter
        .split(',')
        .map(|directive| {
            // `target[span{field=value}]=level`, or a bare target or level.
            let end = directive.find(['[', '=']).unwrap_or(directive.len());
            directive[..end].trim()
        })
        .collect();
    let mut out = filter.trim().trim_end_matches(',').to_string();
    for target in QUIET_TARGETS {
        let named_here = named.iter().any(|n| {
            n.strip_prefix(target)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        });
        if !named_here {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(target);
            out.push_str("=warn");
        }
    }
    out
}

/// The error and all its sources, `: `-separated, for one log field.
pub fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_QUIET: &str = "tokio_postgres=warn,h2=warn,hyper=warn,hyper_util=warn,reqwest=warn";

    #[test]
    fn quiet_targets_stay_quiet_at_every_level() {
        for level in ["trace", "debug", "info", "authbroker=trace", "debug,"] {
            assert_eq!(
                with_quiet_targets(level),
                format!("{},{ALL_QUIET}", level.trim_end_matches(',')),
            );
        }
        assert_eq!(with_quiet_targets(""), ALL_QUIET);
    }

    #[test]
    fn a_target_the_filter_names_is_left_to_it() {
        assert_eq!(
            with_quiet_targets("debug,tokio_postgres=debug"),
            "debug,tokio_postgres=debug,h2=warn,hyper=warn,hyper_util=warn,reqwest=warn"
        );
        assert_eq!(
            with_quiet_targets("tokio_postgres::query=trace"),
            "tokio_postgres::query=trace,h2=warn,hyper=warn,hyper_util=warn,reqwest=warn"
        );
        assert_eq!(
            with_quiet_targets("h2[conn]=trace,hyper"),
            "h2[conn]=trace,hyper,tokio_postgres=warn,hyper_util=warn,reqwest=warn"
        );
        // A prefix of another name is not that name.
        assert!(with_quiet_targets("hyperloop=debug").contains(",hyper=warn"));
    }

    #[test]
    fn the_result_is_a_valid_filter_that_keeps_them_at_warn() {
        use tracing::level_filters::LevelFilter;
        let filter = EnvFilter::try_new(with_quiet_targets("trace")).unwrap();
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::TRACE));
        // The directives, as EnvFilter reads them back.
        let shown = filter.to_string();
        for target in QUIET_TARGETS {
            assert!(shown.contains(&format!("{target}=warn")), "{shown}");
        }
    }
}
