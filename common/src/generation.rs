//! `generation_config.json`: stop tokens and the model author's sampling defaults.

use std::path::Path;

use serde::Deserialize;

use crate::ConfigError;

/// A token id or a list of them (both spellings occur for `eos_token_id`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

/// The keys Tessera uses; every one is optional.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct GenerationConfig {
    pub eos_token_id: Option<TokenIds>,
    pub bos_token_id: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a missing file gives the empty default.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Io { path, source }),
        }
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .clone()
            .map(TokenIds::into_vec)
            .unwrap_or_default()
    }
}
