//! Errors from reading and checking model configuration. Each names the file and the field.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: no `architectures` entry; expected e.g. [\"Qwen3MoeForCausalLM\"]")]
    NoArchitecture { path: PathBuf },
    #[error("{path}: unsupported architecture `{name}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        name: String,
        supported: String,
    },
    #[error("config.json does not fit {architecture}: {reason}")]
    Schema {
        architecture: String,
        reason: String,
    },
    #[error("config field `{field}` = {value}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
    #[error("config field `{field}`: {reason} (not supported yet)")]
    Unsupported { field: String, reason: String },
}

impl ConfigError {
    pub fn invalid(field: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
    pub fn unsupported(field: &str, reason: impl Into<String>) -> Self {
        ConfigError::Unsupported {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
