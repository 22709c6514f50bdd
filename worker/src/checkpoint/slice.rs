//! Reading part of a tensor: the row or column range a tensor-parallel shard owns.
//!
//! Only the bytes of the requested range are touched, so a worker holding 1/8 of a layer pages
//! in 1/8 of its weights rather than the whole tensor. Whole tensors stay borrowed from the
//! mapping; slices are copied into owned storage, since they are not contiguous (columns) or
//! would pin the whole file mapping for a fraction of it (rows).

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;
use tessera_kernels::{DType, HostTensor};

use super::error::CheckpointError;
use super::file::Entry;

/// Part of a tensor to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slice {
    /// The whole tensor, borrowed zero-copy from the memory map when aligned.
    Full,
    /// A range of dim 0 (of a tensor with at least one dimension), copied.
    Rows(Range<usize>),
    /// A range of dim 1 of a 2-D tensor, copied row by row.
    Cols(Range<usize>),
}

/// Reads `slice` of the tensor `name` described by `entry` from `map`.
pub(crate) fn read(
    map: &Arc<Mmap>,
    name: &str,
    entry: &Entry,
    dtype: DType,
    slice: &Slice,
) -> Result<HostTensor, CheckpointError> {
    let shape = &entry.shape;
    let esize = dtype.size();
    let result = match slice {
        Slice::Full => HostTensor::from_shared(map.clone(), entry.start, dtype, shape.clone()),
        Slice::Rows(rows) => {
            let Some((&dim0, rest)) = shape.split_first() else {
                return Err(CheckpointError::bad_slice(name, "Rows of a scalar tensor"));
            };
            check_range(name, rows, dim0, 0)?;
            // Checked: a header may declare a zero-sized tensor whose other dims are huge.
            let row_bytes = checked_bytes(name, rest, esize)?;
            let bytes = bytes_at(
                map,
                name,
                rows.start
                    .checked_mul(row_bytes)
                    .and_then(|off| off.checked_add(entry.start)),
                rows.len().checked_mul(row_bytes),
            )?;
            let mut out_shape = shape.clone();
            if let Some(d0) = out_shape.first_mut() {
                *d0 = rows.len();
            }
            HostTensor::from_bytes(bytes, dtype, out_shape)
        }
        Slice::Cols(cols) => {
            let &[nrows, ncols] = shape.as_slice() else {
                return Err(CheckpointError::bad_slice(
                    name,
                    format!("Cols needs a 2-D tensor, but its shape is {shape:?}"),
                ));
            };
            check_range(name, cols, ncols, 1)?;
            let stride = checked_bytes(name, &[ncols], esize)?;
            let len = cols.len() * esize; // at most `stride`
            let mut out = Vec::new();
            for r in 0..nrows {
                let at = r
                    .checked_mul(stride)
                    .and_then(|off| off.checked_add(entry.start + cols.start * esize));
                out.extend_from_slice(bytes_at(map, name, at, Some(len))?);
            }
            HostTensor::from_bytes(&out, dtype, vec![nrows, cols.len()])
        }
    };
    // Sizes were validated against the header at open, so this is unreachable in practice; it
    // still must not panic.
    result.map_err(|e| CheckpointError::bad_slice(name, e.to_string()))
}

fn check_range(
    name: &str,
    range: &Range<usize>,
    dim: usize,
    axis: usize,
) -> Result<(), CheckpointError> {
    if range.start >= range.end || range.end > dim {
        let what = if range.start >= range.end {
            "is empty"
        } else {
            "is out of bounds"
        };
        return Err(CheckpointError::bad_slice(
            name,
            format!(
                "range {}..{} of dim {axis} (size {dim}) {what}",
                range.start, range.end
            ),
        ));
    }
    Ok(())
}

/// Bytes of `dims` elements of `esize` bytes, or an error if that overflows.
fn checked_bytes(name: &str, dims: &[usize], esize: usize) -> Result<usize, CheckpointError> {
    dims.iter()
        .try_fold(esize, |n, d| n.checked_mul(*d))
        .ok_or_else(|| {
            CheckpointError::bad_slice(name, format!("a slice of dims {dims:?} overflows"))
        })
}

/// `len` bytes at absolute offset `at` of the mapping (`None`: the arithmetic overflowed), or an
/// error rather than a panic.
fn bytes_at<'a>(
    map: &'a Mmap,
    name: &str,
    at: Option<usize>,
    len: Option<usize>,
) -> Result<&'a [u8], CheckpointError> {
    let (Some(at), Some(len)) = (at, len) else {
        return Err(CheckpointError::bad_slice(name, "slice offsets overflow"));
    };
    at.checked_add(len)
        .and_then(|end| map.get(at..end))
        .ok_or_else(|| {
            CheckpointError::bad_slice(name, format!("bytes {at}..+{len} lie beyond the file"))
        })
}
