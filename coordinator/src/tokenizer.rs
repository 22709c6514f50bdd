//! Text ↔ token ids with a model folder's `tokenizer.json`, and streaming detokenisation.
//!
//! Decoding a growing id list token by token can split multi-byte characters and byte-level BPE
//! merges; [`IncrementalDecoder`] re-decodes the tail and only emits text once it is complete
//! (no trailing U+FFFD), so streamed deltas concatenate to exactly the final text.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("cannot load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("tokenizing text failed: {0}")]
    Encode(String),
    #[error("decoding token ids failed: {0}")]
    Decode(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`; `Ok(None)` when the folder has none.
    pub fn load(dir: &Path) -> Result<Option<Self>, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(Tokenizer { inner }))
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (BOS etc.) as
    /// transformers' tokenizers do by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Emits text deltas for a stream of generated ids.
///
/// Each push decodes only a short window: the tokens since the last emitted text plus the few
/// before them (whose text is subtracted), so long generations stay linear, and leading-space
/// rules of the tokenizer's decoder apply as they would to the whole sequence.
#[derive(Clone, Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Window start: the tokens from here to `read` were already emitted.
    prefix: usize,
    /// Tokens before this index have been emitted as text.
    read: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let text = tok.decode(&self.ids[self.prefix..], true)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= before.len()
            || !text.is_char_boundary(before.len())
        {
            return Ok(String::new());
        }
        let delta = text[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let text = tok.decode(&self.ids[self.prefix..], true)?;
        Ok(text.get(before.len()..).unwrap_or_default().to_string())
    }
}
