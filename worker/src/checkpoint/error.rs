//! Errors raised while opening or reading a checkpoint.
//!
//! Checkpoints are large downloads that fail in mundane ways (a shard missing, a file cut short,
//! a config that does not match the weights), so every variant names the file and/or tensor
//! involved: the message alone should tell the user which download to repeat or which
//! `config.json` field is wrong.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no weights in {}: expected model.safetensors.index.json, model.safetensors or *.safetensors",
        dir.display()
    )]
    NoWeights { dir: PathBuf },
    #[error("{} lists shard {}, which does not exist", index.display(), shard.display())]
    MissingShard { index: PathBuf, shard: PathBuf },
    #[error("bad index {}: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
    #[error("bad safetensors header in {}: {reason}", file.display())]
    BadHeader { file: PathBuf, reason: String },
    #[error(
        "{} is truncated: tensor `{tensor}` needs bytes up to {needed}, but the file has {file_len} \
         (re-download it)",
        file.display()
    )]
    Truncated {
        file: PathBuf,
        tensor: String,
        needed: u64,
        file_len: u64,
    },
    #[error(
        "tensor `{name}` not found in {} ({available} tensors{})",
        dir.display(),
        similar_hint(similar)
    )]
    MissingTensor {
        name: String,
        dir: PathBuf,
        /// How many tensors the checkpoint holds.
        available: usize,
        /// Up to three names sharing the longest prefix with `name`.
        similar: Vec<String>,
    },
    #[error(
        "tensor `{tensor}` in {} has shape {found:?}, but config.json implies {expected:?}",
        short(file)
    )]
    ShapeMismatch {
        tensor: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor `{tensor}` in {} has dtype {dtype}; only F32, F16 and BF16 are supported",
        short(file)
    )]
    UnsupportedDtype {
        tensor: String,
        file: PathBuf,
        dtype: String,
    },
    #[error("bad slice of tensor `{tensor}`: {reason}")]
    BadSlice { tensor: String, reason: String },
}

/// The file name alone: tensor-level messages are about the tensor, and shard names are unique
/// within a checkpoint folder.
fn short(file: &Path) -> String {
    file.file_name()
        .unwrap_or(file.as_os_str())
        .to_string_lossy()
        .into_owned()
}

fn similar_hint(similar: &[String]) -> String {
    if similar.is_empty() {
        String::new()
    } else {
        format!("; similar: {}", similar.join(", "))
    }
}

impl CheckpointError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn bad_header(file: &Path, reason: impl Into<String>) -> Self {
        CheckpointError::BadHeader {
            file: file.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn bad_index(path: &Path, reason: impl Into<String>) -> Self {
        CheckpointError::BadIndex {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn bad_slice(tensor: &str, reason: impl Into<String>) -> Self {
        CheckpointError::BadSlice {
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }
}
