//! Collectives among the ranks that share one model replica, shaped like NCCL: every rank calls the
//! same operation in the same order, and every operation has a deadline, so a stalled or dead peer
//! becomes an error instead of a hang.
//!
//! [`SingleRank`] is the world of one (every operation is the identity). [`InProcessGroup`] joins
//! ranks running as threads of one process (tests, and an embedded single-host mode); the TCP
//! implementation between worker processes and NCCL on GPUs implement the same trait.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tessera_kernels::Backend;
use tessera_kernels::cpu::{CpuBackend, CpuTensor};
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

struct Round {
    /// Contributions of the current round, by rank.
    slots: Vec<Option<Arc<CpuTensor>>>,
    deposited: usize,
    /// Ranks that have read the completed round; the round resets when all have.
    read: usize,
    complete: bool,
}

/// Shared state of ranks running as threads of one process.
pub struct InProcessGroup {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    changed: Condvar,
}

impl InProcessGroup {
    /// A group of `world` ranks whose operations fail after `timeout` without all peers.
    pub fn new(world: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(InProcessGroup {
            world,
            timeout,
            round: Mutex::new(Round {
                slots: vec![None; world],
                deposited: 0,
                read: 0,
                complete: false,
            }),
            changed: Condvar::new(),
        })
    }

    /// The handle rank `rank` uses.
    pub fn member(self: &Arc<Self>, rank: usize) -> InProcessRank {
        InProcessRank {
            group: Arc::clone(self),
            rank,
        }
    }

    /// Deposits `mine` and returns every rank's contribution once all have arrived.
    fn exchange(
        &self,
        op: &'static str,
        rank: usize,
        mine: CpuTensor,
    ) -> Result<Vec<Arc<CpuTensor>>, CollectiveError> {
        let deadline = Instant::now() + self.timeout;
        let timeout = || CollectiveError::Timeout {
            op,
            rank,
            timeout: self.timeout,
        };
        let wait = |guard, until: &dyn Fn(&Round) -> bool| {
            let left = deadline.saturating_duration_since(Instant::now());
            let (guard, res) = self
                .changed
                .wait_timeout_while(guard, left, |r| !until(r))
                .map_err(|_| timeout())?;
            if res.timed_out() {
                Err(timeout())
            } else {
                Ok(guard)
            }
        };
        let mut r = self.round.lock().map_err(|_| timeout())?;
        // A previous round still being read must finish before this rank deposits again.
        if r.complete || r.slots[rank].is_some() {
            r = wait(r, &|r: &Round| !r.complete && r.slots[rank].is_none())?;
        }
        r.slots[rank] = Some(Arc::new(mine));
        r.deposited += 1;
        if r.deposited == self.world {
            r.complete = true;
            self.changed.notify_all();
        } else {
            r = wait(r, &|r: &Round| r.complete)?;
        }
        let all: Vec<Arc<CpuTensor>> = r.slots.iter().flatten().cloned().collect();
        r.read += 1;
        if r.read == self.world {
            r.slots.iter_mut().for_each(|s| *s = None);
            (r.deposited, r.read, r.complete) = (0, 0, false);
            self.changed.notify_all();
        }
        Ok(all)
    }
}

/// One rank's handle on an [`InProcessGroup`].
pub struct InProcessRank {
    group: Arc<InProcessGroup>,
    rank: usize,
}

impl Collective<CpuBackend> for InProcessRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, _: &CpuBackend, t: &mut CpuTensor) -> Result<(), CollectiveError> {
        let all = self.group.exchange("all_reduce", self.rank, t.clone())?;
        if let Some(bad) = all.iter().find(|o| (o.rows, o.cols) != (t.rows, t.cols)) {
            return Err(CollectiveError::Mismatch {
                op: "all_reduce",
                rank: self.rank,
                detail: format!(
                    "{}x{} vs a peer's {}x{}",
                    t.rows, t.cols, bad.rows, bad.cols
                ),
            });
        }
        // Sum in rank order on every rank, so all ranks hold bit-identical results.
        t.data.iter_mut().for_each(|v| *v = 0.0);
        for other in &all {
            t.data
                .iter_mut()
                .zip(&other.data)
                .for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn all_gather_cols(&self, _: &CpuBackend, t: CpuTensor) -> Result<CpuTensor, CollectiveError> {
        let rows = t.rows;
        let all = self.group.exchange("all_gather", self.rank, t)?;
        if all.iter().any(|o| o.rows != rows) {
            return Err(CollectiveError::Mismatch {
                op: "all_gather",
                rank: self.rank,
                detail: "row counts differ".into(),
            });
        }
        let cols: usize = all.iter().map(|o| o.cols).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for o in &all {
                data.extend_from_slice(&o.data[r * o.cols..(r + 1) * o.cols]);
            }
        }
        Ok(CpuTensor { data, rows, cols })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
