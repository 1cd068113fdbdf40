//! What every subcommand shares about its result: the output format (`-o text|json|yaml`) and
//! the exit code ([`Exit`]), so scripts get the same contract everywhere.

use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;

/// `-o`: text for people, JSON or YAML (the same documented shape) for scripts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
    Yaml,
}

impl OutputFormat {
    /// The text, or `value` serialised; JSON and YAML end with a newline like the text does.
    pub fn render<T: Serialize>(self, value: &T, text: impl FnOnce() -> String) -> Result<String> {
        Ok(match self {
            Self::Text => text(),
            Self::Json => serde_json::to_string_pretty(value)? + "\n",
            Self::Yaml => serde_yaml::to_string(value)?,
        })
    }
}

/// A subcommand's answer, as its exit code: like `kubectl auth can-i`, "no" is not an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: allowed, ready, compiled cleanly.
    Yes,
    /// 1: denied, not ready, refused objects under `--strict`.
    No,
    /// 2: the question could not be answered (bad input, unknown name, unreachable agent).
    Error,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Self::Yes => 0,
            Self::No => 1,
            Self::Error => 2,
        }
    }

    /// `Yes` when `ok`, `No` otherwise.
    pub fn from_bool(ok: bool) -> Self {
        if ok { Self::Yes } else { Self::No }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}
