//! Tensor-parallel bookkeeping for one rank: which heads and columns it owns, and the collective
//! that joins its partial results with the other ranks'.

use std::ops::Range;
use std::sync::Arc;

use tessera_common::ShardSpec;
use tessera_common::shard::head_split;
use tessera_kernels::Backend;

use crate::WorkerError;
use crate::collective::{Collective, SingleRank};

/// One rank's place in a tensor-parallel group.
pub struct TpContext<B: Backend> {
    pub shard: ShardSpec,
    pub comm: Arc<dyn Collective<B>>,
}

impl<B: Backend> TpContext<B> {
    /// The whole model on one rank.
    pub fn single() -> Self {
        TpContext {
            shard: ShardSpec::whole(),
            comm: Arc::new(SingleRank),
        }
    }

    pub fn world(&self) -> usize {
        self.shard.world_size.max(1)
    }

    pub fn is_first(&self) -> bool {
        self.shard.rank == 0
    }

    /// This rank's query heads, and the KV heads they read ([`head_split`]).
    pub fn heads(
        &self,
        num_heads: usize,
        num_kv_heads: usize,
    ) -> Result<(Range<usize>, Range<usize>), WorkerError> {
        head_split(num_heads, num_kv_heads, self.shard.rank, self.world())
            .map_err(WorkerError::Plan)
    }

    /// Sums partial results over the ranks (a no-op on one rank).
    pub fn all_reduce(&self, b: &B, t: &mut B::Tensor) -> Result<(), WorkerError> {
        if self.world() > 1 {
            self.comm.all_reduce_sum(b, t)?;
        }
        Ok(())
    }
}

/// Scales a head range to a column range of heads `width` wide.
pub fn cols(heads: &Range<usize>, width: usize) -> Range<usize> {
    heads.start * width..heads.end * width
}
