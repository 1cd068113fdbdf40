//! The agent's and the tools' own logs: one facade, tracing, on stderr. `log::` records (ours and
//! our dependencies') are bridged into it, so both kinds of macro end up in one stream, filtered
//! by `RUST_LOG` (default `info`).

use std::io::IsTerminal as _;

use anyhow::{Result, anyhow};
use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp` (RFC 3339, UTC), `level`, `target`, `fields`
    /// (`message` and the event's own fields), for log shippers.
    Json,
}

/// Installs the subscriber (once per process) and the `log` bridge.
pub fn init(format: LogFormat) -> Result<()> {
    let filter = EnvFilter::builder()
        .with_default_directive(tracing::Level::INFO.into())
        .from_env_lossy();
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // `try_init` also installs the `log` -> tracing bridge (feature `tracing-log`).
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    }
    .map_err(|e| anyhow!("installing the logger: {e}"))
}
