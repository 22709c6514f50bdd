//! Any host collective for any backend: activations are copied to the host, exchanged by a
//! [`Collective<CpuBackend>`] (TCP between processes), and copied back.
//!
//! This is how GPU ranks without NCCL (or ranks sharing one GPU, which NCCL refuses) still form a
//! tensor-parallel group: correct everywhere, at the price of a device→host→device round trip per
//! collective. The copies wait for the device, so a step with staged collectives cannot overlap
//! communication with compute; NCCL (`NcclRank`) is the fast path.

use std::sync::Arc;

use tessera_kernels::Backend;
use tessera_kernels::cpu::{CpuBackend, CpuTensor};

use super::{Collective, CollectiveError};

/// Wraps a host collective so that backend `B`'s tensors can use it.
pub struct HostStaged {
    inner: Arc<dyn Collective<CpuBackend>>,
}

impl HostStaged {
    pub fn new(inner: Arc<dyn Collective<CpuBackend>>) -> Self {
        HostStaged { inner }
    }

    /// A device failure while staging, reported as the collective's error so the group is
    /// rebuilt like after any other collective failure.
    fn staging(&self, op: &'static str, e: impl std::fmt::Display) -> CollectiveError {
        CollectiveError::Mismatch {
            op,
            rank: self.inner.rank(),
            detail: format!("copying the tensor between device and host failed: {e}"),
        }
    }

    fn to_host<B: Backend>(
        &self,
        op: &'static str,
        b: &B,
        t: &B::Tensor,
    ) -> Result<CpuTensor, CollectiveError> {
        let (rows, cols) = b.dims(t);
        let data = b.tensor_to_host(t).map_err(|e| self.staging(op, e))?;
        Ok(CpuTensor { data, rows, cols })
    }

    fn to_device<B: Backend>(
        &self,
        op: &'static str,
        b: &B,
        mut t: CpuTensor,
    ) -> Result<B::Tensor, CollectiveError> {
        let (rows, cols) = (t.rows, t.cols);
        b.tensor_from_host(std::mem::take(&mut t.data), rows, cols)
            .map_err(|e| self.staging(op, e))
    }
}

impl<B: Backend> Collective<B> for HostStaged {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, b: &B, t: &mut B::Tensor) -> Result<(), CollectiveError> {
        const OP: &str = "all_reduce";
        let mut host = self.to_host(OP, b, t)?;
        self.inner.all_reduce_sum(&CpuBackend, &mut host)?;
        *t = self.to_device(OP, b, host)?;
        Ok(())
    }
    fn all_gather_cols(&self, b: &B, t: B::Tensor) -> Result<B::Tensor, CollectiveError> {
        const OP: &str = "all_gather";
        let host = self.to_host(OP, b, &t)?;
        let all = self.inner.all_gather_cols(&CpuBackend, host)?;
        self.to_device(OP, b, all)
    }
    fn all_to_all(&self, b: &B, chunks: Vec<B::Tensor>) -> Result<Vec<B::Tensor>, CollectiveError> {
        const OP: &str = "all_to_all";
        let host = chunks
            .iter()
            .map(|c| self.to_host(OP, b, c))
            .collect::<Result<Vec<_>, _>>()?;
        self.inner
            .all_to_all(&CpuBackend, host)?
            .into_iter()
            .map(|c| self.to_device(OP, b, c))
            .collect()
    }
    fn broadcast(&self, b: &B, t: &mut B::Tensor, root: usize) -> Result<(), CollectiveError> {
        const OP: &str = "broadcast";
        let mut host = self.to_host(OP, b, t)?;
        self.inner.broadcast(&CpuBackend, &mut host, root)?;
        *t = self.to_device(OP, b, host)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::InProcessGroup;

    fn t(data: Vec<f32>, cols: usize) -> CpuTensor {
        CpuTensor {
            rows: data.len() / cols,
            data,
            cols,
        }
    }

    /// Every operation goes through the staging copies and gives the host collective's result
    /// (the CPU backend stands in for a device: its copies are real copies).
    #[test]
    fn staged_operations_match_the_host_collective() {
        let world = 3;
        let group = InProcessGroup::new(world, std::time::Duration::from_secs(10));
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let member: Arc<dyn Collective<CpuBackend>> = Arc::new(group.member(rank));
                std::thread::spawn(move || {
                    let staged = HostStaged::new(member);
                    let b = CpuBackend;
                    let mut x = t(vec![rank as f32, 1.0], 2);
                    Collective::<CpuBackend>::all_reduce_sum(&staged, &b, &mut x).unwrap();
                    let gathered = staged
                        .all_gather_cols(&b, t(vec![rank as f32; 2], 1))
                        .unwrap();
                    let chunks = (0..world)
                        .map(|d| t(vec![(10 * rank + d) as f32; d], 1))
                        .collect();
                    let got = staged.all_to_all(&b, chunks).unwrap();
                    let mut root = t(vec![rank as f32; 2], 2);
                    staged.broadcast(&b, &mut root, 2).unwrap();
                    (
                        x.data.clone(),
                        gathered.data.clone(),
                        got,
                        root.data.clone(),
                    )
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let (sum, gathered, got, root) = h.join().unwrap();
            assert_eq!(sum, vec![3.0, 3.0]);
            assert_eq!(gathered, vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
            for (src, c) in got.iter().enumerate() {
                assert_eq!(
                    c.data,
                    vec![(10 * src + rank) as f32; rank],
                    "from rank {src}"
                );
            }
            assert_eq!(root, vec![2.0, 2.0]);
        }
    }
}
