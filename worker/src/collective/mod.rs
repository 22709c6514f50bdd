//! Collectives among the ranks that share one model replica, shaped like NCCL: every rank calls the
//! same operation in the same order, and every operation has a deadline, so a stalled or dead peer
//! becomes an error (naming the operation and the peer) instead of a hang.
//!
//! The operations are NCCL's: all-reduce (sum), all-gather (by columns), all-to-all (each rank
//! sends a distinct chunk to every rank; chunks may have any row count, including zero, as MoE
//! token dispatch needs) and broadcast from a root rank. After any error the group is unusable
//! (peers may be mid-operation); the caller forms a new one.
//!
//! [`SingleRank`] is the world of one (every operation is the identity). [`InProcessGroup`] joins
//! ranks running as threads of one process (tests, and an embedded single-host mode); [`TcpRank`]
//! joins worker processes over TCP; [`NcclRank`] joins GPU ranks through NCCL (its module says how
//! a group forms from NCCL's unique id). [`HostStaged`] lets a device backend use any host
//! collective by copying through host memory (GPU ranks without NCCL, or sharing one GPU).
//! [`Rehearsal`] stands in for a group while one rank profiles a step alone.

mod in_process;
mod nccl;
mod rehearsal;
mod staged;
mod tcp;

use std::borrow::Borrow;
use std::time::Duration;

pub use in_process::{InProcessGroup, InProcessRank};
pub use nccl::NcclRank;
pub use rehearsal::Rehearsal;
pub use staged::HostStaged;
pub use tcp::TcpRank;
use tessera_kernels::Backend;
use tessera_kernels::cpu::CpuTensor;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CollectiveError {
    #[error("{op} on rank {rank}: timed out after {timeout:?} waiting for {}", ranks(.peers))]
    Timeout {
        op: &'static str,
        rank: usize,
        timeout: Duration,
        /// The ranks that had not answered (empty when unknown).
        peers: Vec<usize>,
    },
    #[error("{op} on rank {rank}: {detail}")]
    Mismatch {
        op: &'static str,
        rank: usize,
        detail: String,
    },
    #[error("{op} on rank {rank}: connection to rank {peer} failed: {detail}")]
    Peer {
        op: &'static str,
        rank: usize,
        peer: usize,
        detail: String,
    },
    /// The transport failed (NCCL or the device reported an error, or NCCL is missing); the
    /// group is unusable.
    #[error("{op} on rank {rank}: {detail}")]
    Failed {
        op: &'static str,
        rank: usize,
        detail: String,
    },
    /// A rank panicked inside an operation; the group's shared state cannot be trusted.
    #[error("{op} on rank {rank}: the group is unusable after a panic in an earlier operation")]
    Poisoned { op: &'static str, rank: usize },
}

/// "rank 2", "ranks 1, 3", or "peers" when nobody in particular is known to be missing.
fn ranks(peers: &[usize]) -> String {
    match peers {
        [] => "peers".into(),
        [one] => format!("rank {one}"),
        many => {
            let list: Vec<String> = many.iter().map(usize::to_string).collect();
            format!("ranks {}", list.join(", "))
        }
    }
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

/// Checks an all-to-all contribution has one chunk per rank of the group.
fn check_chunk_count(
    op: &'static str,
    rank: usize,
    from: usize,
    chunks: usize,
    world: usize,
) -> Result<(), CollectiveError> {
    if chunks == world {
        return Ok(());
    }
    let who = if from == rank {
        "this rank".to_string()
    } else {
        format!("rank {from}")
    };
    Err(CollectiveError::Mismatch {
        op,
        rank,
        detail: format!("{who} passed {chunks} chunks for a world of {world} (one per rank)"),
    })
}

/// Checks a broadcast's root is a rank of the group.
fn check_root(
    op: &'static str,
    rank: usize,
    root: usize,
    world: usize,
) -> Result<(), CollectiveError> {
    if root < world {
        return Ok(());
    }
    Err(CollectiveError::Mismatch {
        op,
        rank,
        detail: format!("root {root} is not a rank of a world of {world}"),
    })
}

/// Collective operations over backend `B`'s activations.
pub trait Collective<B: Backend>: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks; every rank receives the result.
    fn all_reduce_sum(&self, b: &B, t: &mut B::Tensor) -> Result<(), CollectiveError>;
    /// Concatenates every rank's columns in rank order; every rank receives the result.
    fn all_gather_cols(&self, b: &B, t: B::Tensor) -> Result<B::Tensor, CollectiveError>;
    /// Sends `chunks[d]` to rank `d` (exactly one chunk per rank, this rank's own included) and
    /// returns the chunk each rank sent here, indexed by source rank. Chunks may have any row
    /// count, zero included (MoE dispatch: the tokens routed to each rank's experts, then the
    /// combine step sends the results back the same way).
    fn all_to_all(&self, b: &B, chunks: Vec<B::Tensor>) -> Result<Vec<B::Tensor>, CollectiveError>;
    /// Replaces `t` on every rank with rank `root`'s `t` (shape included); the root's stays.
    fn broadcast(&self, b: &B, t: &mut B::Tensor, root: usize) -> Result<(), CollectiveError>;
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
    fn all_to_all(&self, _: &B, chunks: Vec<B::Tensor>) -> Result<Vec<B::Tensor>, CollectiveError> {
        check_chunk_count("all_to_all", 0, 0, chunks.len(), 1)?;
        Ok(chunks)
    }
    fn broadcast(&self, _: &B, _: &mut B::Tensor, root: usize) -> Result<(), CollectiveError> {
        check_root("broadcast", 0, root, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_kernels::cpu::CpuBackend;

    #[test]
    fn a_single_rank_is_the_identity_and_checks_its_arguments() {
        let t = |v: f32| CpuTensor {
            data: vec![v; 2],
            rows: 1,
            cols: 2,
        };
        let out = <SingleRank as Collective<CpuBackend>>::all_to_all(
            &SingleRank,
            &CpuBackend,
            vec![t(3.0)],
        )
        .unwrap();
        assert_eq!(out[0].data, vec![3.0, 3.0]);
        let err = <SingleRank as Collective<CpuBackend>>::all_to_all(
            &SingleRank,
            &CpuBackend,
            vec![t(1.0), t(2.0)],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("2 chunks for a world of 1"),
            "{err}"
        );
        let mut x = t(5.0);
        SingleRank.broadcast(&CpuBackend, &mut x, 0).unwrap();
        assert_eq!(x.data, vec![5.0, 5.0]);
        let err = SingleRank.broadcast(&CpuBackend, &mut x, 1).unwrap_err();
        assert!(err.to_string().contains("root 1"), "{err}");
    }

    #[test]
    fn timeouts_name_the_missing_ranks() {
        let err = CollectiveError::Timeout {
            op: "all_to_all",
            rank: 0,
            timeout: Duration::from_millis(100),
            peers: vec![1, 3],
        };
        assert_eq!(
            err.to_string(),
            "all_to_all on rank 0: timed out after 100ms waiting for ranks 1, 3"
        );
    }
}
