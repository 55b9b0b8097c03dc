//! Structured logging with `tracing`: pretty for people, JSON for log pipelines (DESIGN §8).
//!
//! The config chooses format and level; `CUTTLE_LOG_FORMAT` (`pretty`/`json`) and `RUST_LOG`
//! override them without editing the file, which is what operators reach for first. The pretty
//! format is coloured only when stderr is a terminal and `NO_COLOR` is unset or empty
//! (<https://no-color.org>): a log file or a collector never receives escape codes.
//!
//! Every event is one record: a multi-line message (a list of configuration errors) stays one
//! JSON object, its newlines escaped, never one record per line.
//!
//! Whatever the filter says, some records are never written ([`is_withheld`]): `tungstenite`
//! traces every WebSocket frame with its payload (in hex and as bytes), and the first frame
//! of every connection carries the client's credential (PROTOCOL §4). The proxy's own logs
//! name actors and reasons, never tokens; `crate::secret` keeps secrets out of `Debug`.

use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::{SubscriberInitExt, TryInitError};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(settings: &LogSettings) {
    let format = match std::env::var("CUTTLE_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("pretty") => LogFormat::Pretty,
        _ => settings.format,
    };
    // The embedded broker's only clients are this process's own pool connections, and it
    // logs their ordinary comings and goings (a clean DISCONNECT at shutdown) as errors; the
    // proxy logs what matters about them itself (upstream connected, lost, refused), so
    // rumqttd is silent unless the level names it (`log.level: info,rumqttd=warn`).
    let level = if settings.level.contains("rumqttd") {
        settings.level.clone()
    } else {
        format!("{},rumqttd=off", settings.level)
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = colour(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let _ = try_init(format, filter, std::io::stderr, ansi);
}

/// Whether to write ANSI colour: only to a terminal, and never when `NO_COLOR` is set to a
/// non-empty value.
pub fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber: what `filter` enables, less what [`is_withheld`], written
/// to `writer` in `format` (pretty with ANSI colour if `ansi`); `log` records are forwarded to
/// it. Fails when a global subscriber is already set (tests use this to capture the output).
pub fn try_init<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Result<(), TryInitError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let withheld = tracing_subscriber::filter::filter_fn(|m| !is_withheld(m));
    let registry = tracing_subscriber::registry().with(filter).with(withheld);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi && format == LogFormat::Pretty);
    match format {
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
        LogFormat::Pretty => registry.with(layer).try_init(),
    }
}

/// Records never written, whatever `RUST_LOG` or `log.level` say: `tungstenite`'s TRACE
/// records, which dump WebSocket frames — client tokens included — byte for byte.
pub fn is_withheld(metadata: &Metadata<'_>) -> bool {
    let target = metadata.target();
    *metadata.level() == Level::TRACE
        && (target == "tungstenite" || target.starts_with("tungstenite::"))
}

#[cfg(test)]
mod tests {
    use super::colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new("1"))));
    }
}
