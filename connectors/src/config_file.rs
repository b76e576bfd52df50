//! Loading a binary's TOML config file: parse with unknown fields refused, then validate every value
//! at once without I/O, so an operator sees all the problems in one go.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// The secret in a file named by a config (`password_file`, `token_file`, `secret_file`): its first
/// line, without the line ending, so a file written by `echo` works as one written by `printf`.
pub fn read_secret(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.lines().next().unwrap_or_default().to_string())
}

/// A secret a config gives in clear (`password`, `token`) or in a file (`password_file`,
/// `token_file`): the clear one if set, else the file's first line, else `None`.
pub fn resolve_secret(clear: Option<&str>, file: Option<&Path>) -> std::io::Result<Option<String>> {
    match (clear, file) {
        (Some(s), _) => Ok(Some(s.to_string())),
        (None, Some(f)) => read_secret(f).map(Some),
        (None, None) => Ok(None),
    }
}

/// A config that can check its own values.
pub trait Validate {
    /// Every problem, in plain words; empty when the config is usable.
    fn validate(&self) -> Vec<String>;
}

/// The config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown fields.
    #[error("config {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        message: String,
    },
    /// Values are out of range; every problem is listed.
    #[error("config has problems:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Reads, parses and validates a config file.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let config: T =
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
    let problems = config.validate();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}
