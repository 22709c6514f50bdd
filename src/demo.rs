//! The demo model used when no `--model` is given: a small Qwen3-MoE trained on Debian's
//! fortunes, shipped in `models/tessera-demo` (see its MODEL_CARD.md).

use std::path::PathBuf;

use anyhow::{Result, bail};

/// The prompt `tessera generate` continues when given none.
pub const DEFAULT_PROMPT: &str = "A fool and his money";

/// `model`, or the demo model: `models/tessera-demo` under the current directory, else in the
/// source tree this binary was built from.
pub fn model_or_default(model: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m);
    }
    let candidates = [
        PathBuf::from("models/tessera-demo"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tessera-demo"),
    ];
    for c in &candidates {
        if c.join("config.json").exists() {
            return Ok(c.clone());
        }
    }
    bail!(
        "no --model given and the demo model is not at {} or {}; pass --model DIR",
        candidates[0].display(),
        candidates[1].display()
    )
}
