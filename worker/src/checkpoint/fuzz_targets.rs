//! Bodies of the cargo-fuzz targets over checkpoint files (`fuzz/fuzz_targets/`): a safetensors
//! file's bytes and a `model.safetensors.index.json`'s bytes, parsed exactly as
//! [`super::Checkpoint::open`] parses them.
//!
//! They live here, behind the `fuzz-targets` feature, so that `tests/fuzz_regressions.rs` can run
//! them on stable Rust over the checked-in regression inputs. A target returns normally for every
//! input; a panic is the finding.

use std::path::Path;
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};
use safetensors::Dtype;
use tessera_kernels::DType;

use super::file::parse_header;
use super::index::parse_index;
use super::slice::{Slice, read};

/// A safetensors file's bytes: the header must parse into entries that lie inside the data and
/// match their dtype × shape, or fail with an error; then every tensor of a supported dtype is
/// read whole and as a row and a column slice chosen by the input's last bytes (slices out of
/// range must be errors too).
pub fn safetensors_header(data: &[u8]) {
    let Ok(entries) = parse_header(Path::new("fuzz.safetensors"), data) else {
        return;
    };
    for (name, e) in &entries {
        assert!(
            e.start <= e.end && e.end <= data.len(),
            "`{name}`: bytes {}..{} outside a {}-byte file",
            e.start,
            e.end,
            data.len()
        );
        let bytes = e
            .shape
            .iter()
            .try_fold(e.dtype.bitsize(), |n, d| n.checked_mul(*d))
            .map(|bits| bits / 8);
        assert_eq!(
            bytes,
            Some(e.end - e.start),
            "`{name}`: shape {:?} of {:?} disagrees with its byte range",
            e.shape,
            e.dtype
        );
    }
    let Some(map) = mapped(data) else {
        return;
    };
    // Slice bounds from the input's tail, so the fuzzer steers them as it steers the header.
    let tail = |i: usize| usize::from(data.len().checked_sub(i + 1).map_or(0, |at| data[at]));
    for (name, e) in &entries {
        let dtype = match e.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            _ => continue,
        };
        let full = read(&map, name, e, dtype, &Slice::Full);
        assert!(
            full.is_ok(),
            "`{name}`: a validated entry fails to read: {full:?}"
        );
        let (a, b) = (tail(0), tail(1));
        let _ = read(&map, name, e, dtype, &Slice::Rows(a..b));
        let _ = read(&map, name, e, dtype, &Slice::Cols(a..b));
        let _ = read(&map, name, e, dtype, &Slice::Cols(0..usize::MAX));
    }
}

/// `model.safetensors.index.json` bytes: read as the loader reads them (UTF-8 text, then JSON);
/// an accepted index names only plain file names beside it.
pub fn safetensors_index(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(map) = parse_index(Path::new("model.safetensors.index.json"), text) else {
        return;
    };
    for (tensor, file) in &map {
        assert!(
            !file.is_empty() && !file.contains('/') && file != ".." && file != ".",
            "`{tensor}` maps to {file:?}, which is not a plain file name"
        );
    }
}

/// `data` in an anonymous read-only mapping, the type the loader reads tensors from.
fn mapped(data: &[u8]) -> Option<Arc<Mmap>> {
    let mut anon = MmapMut::map_anon(data.len().max(1)).ok()?;
    anon.get_mut(..data.len())?.copy_from_slice(data);
    anon.make_read_only().ok().map(Arc::new)
}
