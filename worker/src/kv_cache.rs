//! The paged KV cache: per-layer block storage on the backend, and the allocator of block ids.
//!
//! Sequences own lists of block ids (their block tables); the backend's attention reads keys and
//! values through those tables, so sequences of any length share one pool without copying. The
//! storage lives with the worker; the allocator lives with whoever schedules (the coordinator, or
//! the single-process engine).

use tessera_kernels::{Backend, KvSpec};

use crate::WorkerError;

pub struct KvCache<B: Backend> {
    pub layers: Vec<B::KvLayer>,
    block_size: usize,
    num_blocks: usize,
}

impl<B: Backend> KvCache<B> {
    /// Allocates storage for every layer spec given (all with the same block geometry).
    pub fn new(backend: &B, specs: Vec<KvSpec>) -> Result<Self, WorkerError> {
        let (num_blocks, block_size) = specs
            .first()
            .map_or((0, 1), |s| (s.num_blocks, s.block_size));
        let layers = specs
            .into_iter()
            .map(|s| backend.alloc_kv(s))
            .collect::<Result<_, _>>()?;
        Ok(KvCache {
            layers,
            block_size,
            num_blocks,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

/// Most blocks a cache may have: block ids are u32 on the wire and in block tables.
pub const MAX_BLOCKS: usize = u32::MAX as usize;

/// Refuses a cache of `specs` (one per layer, `element_bytes` per stored element) whose size
/// overflows, whose block ids would not fit in u32, or which needs more than `available` bytes:
/// the allocation would abort the process.
pub fn check_size(
    specs: &[KvSpec],
    element_bytes: usize,
    available: Option<u64>,
) -> Result<u64, WorkerError> {
    let Some(first) = specs.first() else {
        return Ok(0);
    };
    let what = format!(
        "{} blocks of {} positions over {} layers",
        first.num_blocks,
        first.block_size,
        specs.len()
    );
    if first.num_blocks > MAX_BLOCKS {
        return Err(WorkerError::KvCacheTooLarge(format!(
            "{what}: more than the {MAX_BLOCKS} block ids there are"
        )));
    }
    let bytes = specs
        .iter()
        .try_fold(0u64, |sum, s| sum.checked_add(s.bytes(element_bytes)?))
        .ok_or_else(|| {
            WorkerError::KvCacheTooLarge(format!("{what}: the byte count overflows 64 bits"))
        })?;
    match available {
        Some(limit) if bytes > limit => Err(WorkerError::KvCacheTooLarge(format!(
            "{what} need {} MiB, more than the {} MiB of memory available",
            bytes.div_ceil(1 << 20),
            limit >> 20
        ))),
        _ => Ok(bytes),
    }
}

/// Hands out block ids of a pool.
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    block_size: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockAllocator {
            block_size: block_size.max(1),
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Takes `n` free blocks, or fails without taking any.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, WorkerError> {
        if n > self.free.len() {
            return Err(WorkerError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_kernels::KvValues;

    #[test]
    fn caches_that_cannot_be_held_are_refused_with_their_size() {
        let spec = |num_blocks| KvSpec {
            num_blocks,
            block_size: 16,
            num_kv_heads: 2,
            k_dim: 64,
            v_dim: 64,
            values: KvValues::Separate,
        };
        // 16 × 2 × 128 f32 = 16 KiB a block and layer.
        assert_eq!(check_size(&[spec(4); 2], 4, None).unwrap(), 2 * 4 * 16384);
        // A latent cache stores no values: 16 × 2 × 64 f32 = 8 KiB.
        let latent = KvSpec {
            values: KvValues::KeyPrefix,
            ..spec(4)
        };
        assert_eq!(check_size(&[latent; 2], 4, None).unwrap(), 2 * 4 * 8192);
        assert_eq!(check_size(&[], 4, Some(0)).unwrap(), 0);
        let err = check_size(&[spec(1 << 20); 2], 4, Some(1 << 30)).unwrap_err();
        assert!(
            err.to_string()
                .contains("need 32768 MiB, more than the 1024 MiB of memory available"),
            "{err}"
        );
        let err = check_size(&[spec(usize::MAX)], 4, None).unwrap_err();
        assert!(err.to_string().contains("block ids"), "{err}");
        let wide = KvSpec {
            k_dim: usize::MAX / 4,
            ..spec(8)
        };
        let err = check_size(&[wide], 4, None).unwrap_err();
        assert!(err.to_string().contains("overflows 64 bits"), "{err}");
    }

    #[test]
    fn allocation_is_all_or_nothing_and_release_returns_blocks() {
        let mut alloc = BlockAllocator::new(4, 16);
        assert_eq!(alloc.blocks_for(17), 2);
        let a = alloc.allocate(3).unwrap();
        assert!(matches!(
            alloc.allocate(2),
            Err(WorkerError::OutOfBlocks { needed: 2, free: 1 })
        ));
        assert_eq!(alloc.num_free(), 1);
        alloc.release(a);
        assert_eq!(alloc.num_free(), 4);
    }
}
