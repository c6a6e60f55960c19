//! Logs: text or JSON lines on stderr. `SHARDSYNC_LOG` (an EnvFilter
//! directive, e.g. `debug`) overrides the default level.
//!
//! Credentials never reach a log line: URLs are parsed at the edge and
//! endpoints display as `host:port`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SHARDSYNC_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,ractor=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
