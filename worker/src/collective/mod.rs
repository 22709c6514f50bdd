//! Collectives among the ranks that share one model replica, shaped like NCCL: every rank calls the
//! same operation in the same order, and every operation has a deadline, so a stalled or dead peer
//! becomes an error instead of a hang.
//!
//! [`SingleRank`] is the world of one (every operation is the identity). [`InProcessGroup`] joins
//! ranks running as threads of one process (tests, and an embedded single-host mode); [`TcpRank`]
//! joins worker processes over TCP; NCCL on GPUs implements the same trait.

mod in_process;
mod tcp;

use std::borrow::Borrow;
use std::time::Duration;

pub use in_process::{InProcessGroup, InProcessRank};
pub use tcp::TcpRank;
use tessera_kernels::Backend;
use tessera_kernels::cpu::CpuTensor;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CollectiveError {
    #[error("{op} on rank {rank}: timed out after {timeout:?} waiting for peers")]
    Timeout {
        op: &'static str,
        rank: usize,
        timeout: Duration,
    },
    #[error("{op} on rank {rank}: {detail}")]
    Mismatch {
        op: &'static str,
        rank: usize,
        detail: String,
    },
    #[error("{op} on rank {rank}: peer connection failed: {detail}")]
    Peer {
        op: &'static str,
        rank: usize,
        detail: String,
    },
}

/// Sums `all` (every rank's contribution, in rank order) into `out`, so every rank computes
/// bit-identical results; checks the shapes agree.
fn sum_in_rank_order(
    op: &'static str,
    rank: usize,
    out: &mut CpuTensor,
    all: &[impl Borrow<CpuTensor>],
) -> Result<(), CollectiveError> {
    if let Some(bad) = all
        .iter()
        .map(Borrow::borrow)
        .find(|o| (o.rows, o.cols) != (out.rows, out.cols))
    {
        return Err(CollectiveError::Mismatch {
            op,
            rank,
            detail: format!(
                "{}x{} vs a peer's {}x{}",
                out.rows, out.cols, bad.rows, bad.cols
            ),
        });
    }
    out.data.iter_mut().for_each(|v| *v = 0.0);
    for other in all {
        out.data
            .iter_mut()
            .zip(&other.borrow().data)
            .for_each(|(a, b)| *a += b);
    }
    Ok(())
}

/// Joins every rank's columns (in rank order) row by row.
fn concat_cols(
    op: &'static str,
    rank: usize,
    all: &[impl Borrow<CpuTensor>],
) -> Result<CpuTensor, CollectiveError> {
    let rows = all.first().map_or(0, |t| t.borrow().rows);
    if all.iter().any(|o| o.borrow().rows != rows) {
        return Err(CollectiveError::Mismatch {
            op,
            rank,
            detail: "row counts differ".into(),
        });
    }
    let cols: usize = all.iter().map(|o| o.borrow().cols).sum();
    let mut data = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for o in all.iter().map(Borrow::borrow) {
            data.extend_from_slice(&o.data[r * o.cols..(r + 1) * o.cols]);
        }
    }
    Ok(CpuTensor { data, rows, cols })
}

/// Collective operations over backend `B`'s activations.
pub trait Collective<B: Backend>: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks; every rank receives the result.
    fn all_reduce_sum(&self, b: &B, t: &mut B::Tensor) -> Result<(), CollectiveError>;
    /// Concatenates every rank's columns in rank order; every rank receives the result.
    fn all_gather_cols(&self, b: &B, t: B::Tensor) -> Result<B::Tensor, CollectiveError>;
}

/// The world of one rank.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl<B: Backend> Collective<B> for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &B, _: &mut B::Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather_cols(&self, _: &B, t: B::Tensor) -> Result<B::Tensor, CollectiveError> {
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_kernels::cpu::CpuBackend;

    fn t(v: Vec<f32>, cols: usize) -> CpuTensor {
        CpuTensor {
            rows: v.len() / cols,
            cols,
            data: v,
        }
    }

    #[test]
    fn all_reduce_and_all_gather_across_threads_many_rounds() {
        let group = InProcessGroup::new(3, Duration::from_secs(5));
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let member = group.member(rank);
                std::thread::spawn(move || {
                    for round in 0..50 {
                        let mut x = t(vec![rank as f32 + round as f32; 4], 2);
                        member.all_reduce_sum(&CpuBackend, &mut x).unwrap();
                        assert_eq!(x.data, vec![3.0 + 3.0 * round as f32; 4]);
                        let g = member
                            .all_gather_cols(&CpuBackend, t(vec![rank as f32; 2], 1))
                            .unwrap();
                        assert_eq!((g.rows, g.cols), (2, 3));
                        assert_eq!(g.data, vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_missing_peer_is_a_timeout_not_a_hang() {
        let group = InProcessGroup::new(2, Duration::from_millis(100));
        let mut x = t(vec![1.0], 1);
        let err = group
            .member(0)
            .all_reduce_sum(&CpuBackend, &mut x)
            .unwrap_err();
        assert!(
            matches!(err, CollectiveError::Timeout { rank: 0, .. }),
            "{err}"
        );
    }
}
