//! A rank's stand-in for its group while it rehearses a step alone: what the profile of the
//! largest step ([`crate::profile`]) runs a tensor-parallel rank with.
//!
//! Every operation returns a result of the shape the real one would, so the step allocates what
//! it will allocate in the group, but nobody is waited for: a rank profiles as soon as its own
//! weights are in, however long the others take to load theirs. The values are not the group's
//! (an all-reduce keeps this rank's part, an all-gather repeats it), which a profile, measuring
//! memory, does not read.

use tessera_kernels::Backend;

use super::{Collective, CollectiveError, check_root};

/// The stand-in for rank `rank` of a group of `world`.
#[derive(Clone, Copy, Debug)]
pub struct Rehearsal {
    pub rank: usize,
    pub world: usize,
}

impl Rehearsal {
    fn failed(&self, op: &'static str, e: impl std::fmt::Display) -> CollectiveError {
        CollectiveError::Failed {
            op,
            rank: self.rank,
            detail: format!("rehearsing alone: {e}"),
        }
    }
}

impl<B: Backend> Collective<B> for Rehearsal {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, _: &B, _: &mut B::Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }
    /// This rank's columns, once per rank: the full width, as the group's all-gather gives.
    fn all_gather_cols(&self, b: &B, t: B::Tensor) -> Result<B::Tensor, CollectiveError> {
        const OP: &str = "all_gather_cols";
        let (rows, cols) = b.dims(&t);
        let host = b.tensor_to_host(&t).map_err(|e| self.failed(OP, e))?;
        let mut wide = Vec::with_capacity(rows * cols * self.world);
        for row in host.chunks(cols.max(1)).take(rows) {
            for _ in 0..self.world {
                wide.extend_from_slice(row);
            }
        }
        b.tensor_from_host(wide, rows, cols * self.world)
            .map_err(|e| self.failed(OP, e))
    }
    /// What the peers would send is theirs to know: refused, so a step that needs it fails its
    /// rehearsal visibly.
    fn all_to_all(&self, _: &B, _: Vec<B::Tensor>) -> Result<Vec<B::Tensor>, CollectiveError> {
        Err(self.failed("all_to_all", "the peers' chunks cannot be rehearsed"))
    }
    fn broadcast(&self, _: &B, _: &mut B::Tensor, root: usize) -> Result<(), CollectiveError> {
        check_root("broadcast", self.rank, root, self.world)
    }
}

#[cfg(test)]
mod tests {
    use tessera_kernels::cpu::CpuBackend;

    use super::*;

    #[test]
    fn a_rehearsal_gives_the_groups_shapes_without_peers() {
        let b = CpuBackend;
        let r = Rehearsal { rank: 1, world: 3 };
        let t = b.tensor_from_host(vec![1.0, 2.0, 3.0, 4.0], 2, 2).unwrap();
        let wide = r.all_gather_cols(&b, t).unwrap();
        assert_eq!(b.dims(&wide), (2, 6));
        assert_eq!(
            b.tensor_to_host(&wide).unwrap(),
            [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 3.0, 4.0]
        );
        let mut t = b.tensor_from_host(vec![5.0], 1, 1).unwrap();
        Collective::<CpuBackend>::all_reduce_sum(&r, &b, &mut t).unwrap();
        assert_eq!(b.tensor_to_host(&t).unwrap(), [5.0]);
        assert!(Collective::<CpuBackend>::broadcast(&r, &b, &mut t, 3).is_err());
        let err = Collective::<CpuBackend>::all_to_all(&r, &b, vec![]).unwrap_err();
        assert!(err.to_string().contains("rehearsing alone"), "{err}");
    }
}
