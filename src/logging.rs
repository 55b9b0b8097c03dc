//! Structured logging with `tracing`: pretty for people, JSON for log pipelines (DESIGN §8).
//!
//! The config chooses format and level; `CUTTLE_LOG_FORMAT` (`pretty`/`json`) and `RUST_LOG`
//! override them without editing the file, which is what operators reach for first.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(settings: &LogSettings) {
    let format = match std::env::var("CUTTLE_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("pretty") => LogFormat::Pretty,
        _ => settings.format,
    };
    // The embedded broker logs every client connect at info; the proxy's own logs say what
    // matters, so rumqttd is quieted unless the level names it.
    let level = if settings.level.contains("rumqttd") {
        settings.level.clone()
    } else {
        format!("{},rumqttd=warn", settings.level)
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
