//! Host-resident tensors in their stored dtype.
//!
//! A checkpoint's tensors are usually borrowed straight from the memory-mapped file (no copy, no
//! upcast: a 60 GB bf16 checkpoint stays 60 GB). Slices of tensors (a tensor-parallel shard) and
//! tensors whose bytes are not aligned for their dtype are copied into owned, aligned storage.

use std::any::Any;
use std::sync::Arc;

use half::{bf16, f16};

use crate::{BackendError, DType, Result};

/// Something that owns a byte buffer that outlives every tensor borrowed from it (an `Mmap`).
pub trait ByteOwner: Any + Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl<T: AsRef<[u8]> + Any + Send + Sync> ByteOwner for T {
    fn bytes(&self) -> &[u8] {
        self.as_ref()
    }
}

/// Element storage of a [`HostTensor`].
#[derive(Clone)]
pub enum HostData {
    /// Borrowed from a shared byte owner; `offset` is aligned for the dtype.
    Shared {
        owner: Arc<dyn ByteOwner>,
        offset: usize,
        len: usize,
    },
    F32(Arc<Vec<f32>>),
    /// Raw 16-bit patterns for F16 or BF16.
    U16(Arc<Vec<u16>>),
}

/// A typed view of a tensor's elements.
#[derive(Clone, Copy)]
pub enum WeightView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// Whether [`HostTensor::block_rows`] keeps each block as stored or transposes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockLayout {
    AsStored,
    Transposed,
}

/// A tensor on the host: dtype, shape and elements (row-major).
#[derive(Clone)]
pub struct HostTensor {
    dtype: DType,
    shape: Vec<usize>,
    data: HostData,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostTensor({} {:?})", self.dtype, self.shape)
    }
}

impl HostTensor {
    /// A tensor borrowing `len` bytes at `offset` of `owner`, copied if misaligned for `dtype`.
    pub fn from_shared(
        owner: Arc<dyn ByteOwner>,
        offset: usize,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Result<Self> {
        let all = owner.bytes();
        let len = shape
            .iter()
            .try_fold(dtype.size(), |n, d| n.checked_mul(*d));
        let Some(bytes) = len
            .and_then(|len| offset.checked_add(len))
            .and_then(|end| all.get(offset..end))
        else {
            return Err(BackendError::invalid(
                "HostTensor::from_shared",
                format!(
                    "{dtype} tensor of shape {shape:?} at byte {offset} lies beyond a buffer of {}",
                    all.len()
                ),
            ));
        };
        let len = bytes.len();
        if !(bytes.as_ptr() as usize).is_multiple_of(dtype.size()) {
            return Self::from_bytes(bytes, dtype, shape);
        }
        Ok(Self {
            dtype,
            shape,
            data: HostData::Shared { owner, offset, len },
        })
    }

    /// A tensor owning a copy of little-endian `bytes`.
    pub fn from_bytes(bytes: &[u8], dtype: DType, shape: Vec<usize>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * dtype.size() {
            return Err(BackendError::shape(
                "HostTensor::from_bytes",
                format!(
                    "{} bytes for {n} {dtype} elements of shape {shape:?}",
                    bytes.len()
                ),
            ));
        }
        let data = match dtype {
            DType::F32 => HostData::F32(Arc::new(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )),
            DType::F16 | DType::BF16 => HostData::U16(Arc::new(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )),
        };
        Ok(Self { dtype, shape, data })
    }

    /// An owned f32 tensor.
    pub fn from_f32(values: Vec<f32>, shape: Vec<usize>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(BackendError::shape(
                "HostTensor::from_f32",
                format!("{} values for shape {shape:?}", values.len()),
            ));
        }
        Ok(Self {
            dtype: DType::F32,
            shape,
            data: HostData::F32(Arc::new(values)),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes held (or borrowed) for the elements.
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Whether the elements are borrowed from a shared owner (e.g. the mmap) rather than copied.
    pub fn is_shared(&self) -> bool {
        matches!(self.data, HostData::Shared { .. })
    }

    /// The elements, typed by dtype.
    pub fn view(&self) -> WeightView<'_> {
        match (&self.data, self.dtype) {
            (HostData::Shared { owner, offset, len }, dtype) => {
                let bytes = &owner.bytes()[*offset..*offset + *len];
                // Alignment was checked at construction, so these casts cannot fail.
                match dtype {
                    DType::F32 => WeightView::F32(bytemuck::cast_slice(bytes)),
                    DType::F16 => WeightView::F16(bytemuck::cast_slice(bytes)),
                    DType::BF16 => WeightView::BF16(bytemuck::cast_slice(bytes)),
                }
            }
            (HostData::F32(v), _) => WeightView::F32(v),
            (HostData::U16(v), DType::F16) => WeightView::F16(bytemuck::cast_slice(v)),
            (HostData::U16(v), _) => WeightView::BF16(bytemuck::cast_slice(v)),
        }
    }

    /// All elements converted to f32 (for small tensors: norms, biases, tests).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.view() {
            WeightView::F32(v) => v.to_vec(),
            WeightView::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            WeightView::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

impl HostTensor {
    /// From a matrix of `blocks` equal row blocks (`[blocks·r, c]`, e.g. one block per attention
    /// head), rows `part` of every block: `[blocks·part.len(), c]`, or with each block's part
    /// transposed, `[blocks·c, part.len()]`. Owned, in the same dtype.
    pub fn block_rows(
        &self,
        blocks: usize,
        part: std::ops::Range<usize>,
        layout: BlockLayout,
    ) -> Result<HostTensor> {
        let &[rows, c] = self.shape.as_slice() else {
            return Err(BackendError::shape(
                "HostTensor::block_rows",
                format!("{:?} is not a matrix", self.shape),
            ));
        };
        if blocks == 0 || !rows.is_multiple_of(blocks) || part.end > rows / blocks {
            return Err(BackendError::shape(
                "HostTensor::block_rows",
                format!("rows {part:?} of {blocks} blocks of a [{rows}, {c}] matrix"),
            ));
        }
        let r = rows / blocks;
        let p = part.len();
        let pick = |b: usize, i: usize, j: usize| (b * r + part.start + i) * c + j;
        fn gather<T: Copy>(v: &[T], n: usize, at: impl Fn(usize) -> usize) -> Vec<T> {
            (0..n).map(|i| v[at(i)]).collect()
        }
        // Output element `o`'s source, for either layout.
        let at = |o: usize| {
            let (b, within) = (o / (p * c), o % (p * c));
            match layout {
                BlockLayout::AsStored => pick(b, within / c, within % c),
                BlockLayout::Transposed => pick(b, within % p, within / p),
            }
        };
        let n = blocks * p * c;
        let data = match self.view() {
            WeightView::F32(v) => HostData::F32(Arc::new(gather(v, n, at))),
            WeightView::F16(v) => HostData::U16(Arc::new(
                gather(v, n, at).iter().map(|x| x.to_bits()).collect(),
            )),
            WeightView::BF16(v) => HostData::U16(Arc::new(
                gather(v, n, at).iter().map(|x| x.to_bits()).collect(),
            )),
        };
        let shape = match layout {
            BlockLayout::AsStored => vec![blocks * p, c],
            BlockLayout::Transposed => vec![blocks * c, p],
        };
        Ok(HostTensor {
            dtype: self.dtype,
            shape,
            data,
        })
    }
}

impl WeightView<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightView::F32(v) => v.len(),
            WeightView::F16(v) => v.len(),
            WeightView::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` (a weight's rows `a..b` are elements `a·cols .. b·cols`).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        match self {
            WeightView::F32(v) => WeightView::F32(&v[range]),
            WeightView::F16(v) => WeightView::F16(&v[range]),
            WeightView::BF16(v) => WeightView::BF16(&v[range]),
        }
    }

    /// Converts elements `start..start + out.len()` to f32 into `out`.
    #[inline]
    pub fn convert_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            WeightView::F32(v) => out.copy_from_slice(&v[start..end]),
            WeightView::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..end]) {
                    *o = x.to_f32();
                }
            }
            WeightView::BF16(v) => {
                // bf16 is the top half of an f32: a shift, which vectorises.
                let bits: &[u16] = bytemuck::cast_slice(&v[start..end]);
                for (o, b) in out.iter_mut().zip(bits) {
                    *o = f32::from_bits((*b as u32) << 16);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misaligned_shared_bytes_are_copied() {
        let mut buf = vec![0u8; 9];
        buf[1..5].copy_from_slice(&1.5f32.to_le_bytes());
        buf[5..9].copy_from_slice(&(-2.0f32).to_le_bytes());
        let owner: Arc<dyn ByteOwner> = Arc::new(buf);
        let t = HostTensor::from_shared(owner, 1, DType::F32, vec![2]).unwrap();
        assert_eq!(t.to_f32_vec(), vec![1.5, -2.0]);
    }

    #[test]
    fn out_of_range_shared_bytes_are_an_error() {
        let owner: Arc<dyn ByteOwner> = Arc::new(vec![0u8; 8]);
        assert!(HostTensor::from_shared(owner, 4, DType::F32, vec![2]).is_err());
    }

    #[test]
    fn bf16_conversion_is_exact() {
        let vals = [1.0f32, -0.5, 3.25, 1e-3];
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let t = HostTensor::from_bytes(&bytes, DType::BF16, vec![4]).unwrap();
        let got = t.to_f32_vec();
        for (g, v) in got.iter().zip(vals) {
            assert_eq!(*g, bf16::from_f32(v).to_f32());
        }
    }

    #[test]
    fn block_rows_picks_and_transposes_each_block() {
        // Two blocks of three rows, two columns: row r of block b is [10b + r, 10b + r + 0.5].
        let vals: Vec<f32> = (0..2)
            .flat_map(|b| {
                (0..3).flat_map(move |r| [(10 * b + r) as f32, (10 * b + r) as f32 + 0.5])
            })
            .collect();
        let bits: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        for t in [
            HostTensor::from_f32(vals.clone(), vec![6, 2]).unwrap(),
            HostTensor::from_bytes(&bits, DType::BF16, vec![6, 2]).unwrap(),
        ] {
            let kept = t.block_rows(2, 1..3, BlockLayout::AsStored).unwrap();
            assert_eq!((kept.dtype(), kept.shape()), (t.dtype(), &[4, 2][..]));
            assert_eq!(
                kept.to_f32_vec(),
                [1.0, 1.5, 2.0, 2.5, 11.0, 11.5, 12.0, 12.5]
            );
            let turned = t.block_rows(2, 0..2, BlockLayout::Transposed).unwrap();
            assert_eq!(turned.shape(), &[4, 2]);
            assert_eq!(
                turned.to_f32_vec(),
                [0.0, 1.0, 0.5, 1.5, 10.0, 11.0, 10.5, 11.5]
            );
        }
        let t = HostTensor::from_f32(vals, vec![6, 2]).unwrap();
        let err = t.block_rows(4, 0..1, BlockLayout::AsStored).unwrap_err();
        assert!(err.to_string().contains("4 blocks"), "{err}");
        assert!(t.block_rows(2, 2..4, BlockLayout::AsStored).is_err());
    }
}
