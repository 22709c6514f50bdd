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
