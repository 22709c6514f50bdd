//! `model.safetensors.index.json`: which shard file holds each tensor.
//!
//! Only `weight_map` matters to us; `metadata.total_size` and any other fields are ignored, since
//! the shards' own headers are the authority on sizes.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::error::CheckpointError;

/// File name of a sharded checkpoint's index.
pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads an index and returns tensor name → shard file name (relative to the index's folder).
pub(crate) fn read_index(path: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|e| CheckpointError::io(path, e))?;
    parse_index(path, &text)
}

pub(crate) fn parse_index(
    path: &Path,
    text: &str,
) -> Result<BTreeMap<String, String>, CheckpointError> {
    let bad = |reason: String| CheckpointError::bad_index(path, reason);
    let root: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let Some(map) = root.get("weight_map").and_then(Value::as_object) else {
        return Err(bad("no `weight_map` object".into()));
    };
    if map.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    let mut out = BTreeMap::new();
    for (name, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(bad(format!(
                "`weight_map` entry for `{name}` is not a string: {shard}"
            )));
        };
        // Shards must sit beside the index: an index is downloaded data and must not be able to
        // point us at arbitrary files elsewhere on disk.
        // The whole string must be the file name: `components()` would also accept `x/` (a
        // trailing separator), which names no file (found by the `safetensors_index` fuzzer).
        if Path::new(shard).file_name().and_then(|n| n.to_str()) != Some(shard) {
            return Err(bad(format!(
                "shard `{shard}` for `{name}` is not a plain file name in the checkpoint folder"
            )));
        }
        out.insert(name.clone(), shard.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BTreeMap<String, String>, CheckpointError> {
        parse_index(Path::new("idx.json"), text)
    }

    #[test]
    fn checkpoint_index_accepts_weight_map_and_ignores_metadata() {
        let m = parse(r#"{"metadata":{"total_size":8},"weight_map":{"a":"s1","b":"s2"}}"#).unwrap();
        assert_eq!(m.get("a").map(String::as_str), Some("s1"));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn checkpoint_index_rejects_malformed_entries() {
        for text in [
            "{",
            r#"{"metadata":{}}"#,
            r#"{"weight_map":[]}"#,
            r#"{"weight_map":{}}"#,
            r#"{"weight_map":{"a":3}}"#,
            r#"{"weight_map":{"a":"../x.safetensors"}}"#,
            r#"{"weight_map":{"a":"/etc/passwd"}}"#,
            r#"{"weight_map":{"a":"sub/x.safetensors"}}"#,
            r#"{"weight_map":{"a":"x.safetensors/"}}"#,
            r#"{"weight_map":{"a":"."}}"#,
            r#"{"weight_map":{"a":""}}"#,
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(err, CheckpointError::BadIndex { .. }),
                "{text}: {err}"
            );
            assert!(err.to_string().contains("idx.json"), "{err}");
        }
    }
}
