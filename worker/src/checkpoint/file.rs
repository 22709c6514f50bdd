//! One memory-mapped safetensors file: its header parsed and every tensor's bytes bounds-checked.
//!
//! The safetensors crate's `read_metadata` insists that the header covers the buffer exactly,
//! which turns a truncated download into an anonymous "incomplete metadata" error. We instead
//! let the crate parse and validate the header JSON (dtypes, shapes, contiguous offsets) and
//! check the data region against the file length ourselves, so the message can name the first
//! tensor that was cut off.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::Dtype;
use safetensors::tensor::Metadata;

use super::error::CheckpointError;

/// Bytes of the little-endian header length that starts every safetensors file.
const LEN_BYTES: usize = 8;
/// The safetensors crate's own cap on header size; anything larger is corruption, and we should
/// not try to parse a 4 GB "header".
const MAX_HEADER: u64 = 100_000_000;

/// An open safetensors file.
pub(crate) struct Shard {
    pub(crate) path: PathBuf,
    pub(crate) map: Arc<Mmap>,
}

/// Where one tensor lives inside a [`Shard`]; `start..end` are absolute offsets in the mapping,
/// already checked to lie within it.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// Maps `path` and validates its header. Tensors come back in file order.
pub(crate) fn open_shard(path: &Path) -> Result<(Shard, Vec<(String, Entry)>), CheckpointError> {
    let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| CheckpointError::io(path, e))?
        .len();
    if file_len < LEN_BYTES as u64 {
        // Checked before mapping: mapping an empty file is not portable.
        return Err(CheckpointError::bad_header(
            path,
            format!("file of {file_len} bytes is too short to hold a header length"),
        ));
    }
    // SAFETY: the file is opened read-only and the mapping is never written through. Another
    // process truncating or rewriting the file while it is mapped would change (or unmap) the
    // bytes under us; like every mmap-based loader, we treat modifying a checkpoint in use as
    // unsupported. All offsets into the mapping are bounds-checked below, never trusted.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
    let entries = parse_header(path, &map)?;
    tracing::debug!(file = %path.display(), tensors = entries.len(), "opened safetensors file");
    Ok((
        Shard {
            path: path.to_path_buf(),
            map: Arc::new(map),
        },
        entries,
    ))
}

pub(crate) fn parse_header(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<(String, Entry)>, CheckpointError> {
    let file_len = bytes.len() as u64;
    let mut len_bytes = [0u8; LEN_BYTES];
    if let Some(head) = bytes.get(..LEN_BYTES) {
        len_bytes.copy_from_slice(head);
    }
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER {
        return Err(CheckpointError::bad_header(
            path,
            format!("header length {header_len} exceeds the {MAX_HEADER}-byte limit"),
        ));
    }
    let data_start = LEN_BYTES as u64 + header_len;
    if data_start > file_len {
        return Err(CheckpointError::bad_header(
            path,
            format!(
                "header length {header_len} reaches beyond the end of the {file_len}-byte file"
            ),
        ));
    }
    // Both fit in usize: they are at most the mapping's length.
    let data_start = data_start as usize;
    let header = bytes.get(LEN_BYTES..data_start).unwrap_or_default();
    let header = std::str::from_utf8(header)
        .map_err(|e| CheckpointError::bad_header(path, format!("header is not UTF-8: {e}")))?;
    // Deserializing `Metadata` also runs the crate's validation: known dtypes, offsets that tile
    // the data region from 0 with no gaps, and byte lengths that match dtype × shape.
    let metadata: Metadata = serde_json::from_str(header)
        .map_err(|e| CheckpointError::bad_header(path, format!("invalid header JSON: {e}")))?;

    let infos = metadata.tensors();
    let mut entries = Vec::with_capacity(infos.len());
    for name in metadata.offset_keys() {
        let Some(info) = infos.get(&name) else {
            continue;
        };
        let (start, end) = info.data_offsets;
        let abs = |off: usize| (data_start as u64).checked_add(off as u64);
        let (Some(abs_start), Some(abs_end)) = (abs(start), abs(end)) else {
            return Err(CheckpointError::bad_header(
                path,
                format!("offsets of `{name}` overflow"),
            ));
        };
        // Offsets are in file order, so the first tensor beyond the end is the first one cut off.
        if abs_end > file_len {
            return Err(CheckpointError::Truncated {
                file: path.to_path_buf(),
                tensor: name,
                needed: abs_end,
                file_len,
            });
        }
        let entry = Entry {
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: abs_start as usize,
            end: abs_end as usize,
        };
        entries.push((name, entry));
    }
    let data_end = data_start as u64 + metadata.data_len() as u64;
    if data_end < file_len {
        // Harmless for reading, but worth a note: the file is not what the header describes.
        tracing::debug!(
            file = %path.display(),
            extra = file_len - data_end,
            "safetensors file has trailing bytes after its last tensor"
        );
    }
    Ok(entries)
}
