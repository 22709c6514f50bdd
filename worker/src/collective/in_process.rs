//! Ranks running as threads of one process, exchanging through shared memory.
//!
//! Every operation is one round: each rank deposits its parts (one tensor, or one chunk per rank
//! for all-to-all) tagged with the operation, waits until all ranks have deposited, and reads what
//! it needs. Tags are compared, so ranks calling different operations fail with a mismatch instead
//! of combining unrelated tensors.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tessera_kernels::cpu::{CpuBackend, CpuTensor};

use super::{
    Collective, CollectiveError, check_chunk_count, check_root, concat_cols, sum_in_rank_order,
};

/// One rank's contribution to a round.
struct Deposit {
    op: &'static str,
    /// The broadcast root (0 for other operations); every rank must agree on it.
    root: usize,
    parts: Vec<CpuTensor>,
}

struct Round {
    /// Contributions of the current round, by rank.
    slots: Vec<Option<Arc<Deposit>>>,
    deposited: usize,
    /// Which ranks have read the completed round; the round resets when all have.
    read: Vec<bool>,
    complete: bool,
}

impl Round {
    /// Ranks whose deposit (or, once complete, whose read) this round still waits for.
    fn laggards(&self) -> Vec<usize> {
        if self.complete {
            (0..self.read.len()).filter(|&r| !self.read[r]).collect()
        } else {
            (0..self.slots.len())
                .filter(|&r| self.slots[r].is_none())
                .collect()
        }
    }
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
                read: vec![false; world],
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

    /// Waits (until `deadline`) for `ready`; a timeout names the ranks the round waits for.
    fn wait<'a>(
        &self,
        guard: MutexGuard<'a, Round>,
        deadline: Instant,
        (op, rank): (&'static str, usize),
        ready: impl Fn(&Round) -> bool,
    ) -> Result<MutexGuard<'a, Round>, CollectiveError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let (guard, res) = self
            .changed
            .wait_timeout_while(guard, left, |r| !ready(r))
            .map_err(|_| CollectiveError::Poisoned { op, rank })?;
        if res.timed_out() {
            return Err(CollectiveError::Timeout {
                op,
                rank,
                timeout: self.timeout,
                peers: guard
                    .laggards()
                    .into_iter()
                    .filter(|&r| r != rank)
                    .collect(),
            });
        }
        Ok(guard)
    }

    /// Deposits `mine` and returns every rank's deposit (by rank) once all have arrived; fails
    /// when a rank called a different operation or named a different root.
    fn exchange(&self, rank: usize, mine: Deposit) -> Result<Vec<Arc<Deposit>>, CollectiveError> {
        let (op, root) = (mine.op, mine.root);
        let deadline = Instant::now() + self.timeout;
        let mut r = self
            .round
            .lock()
            .map_err(|_| CollectiveError::Poisoned { op, rank })?;
        // A previous round still being read must finish before this rank deposits again.
        if r.complete || r.slots[rank].is_some() {
            r = self.wait(r, deadline, (op, rank), |r| {
                !r.complete && r.slots[rank].is_none()
            })?;
        }
        r.slots[rank] = Some(Arc::new(mine));
        r.deposited += 1;
        if r.deposited == self.world {
            r.complete = true;
            self.changed.notify_all();
        } else {
            r = self.wait(r, deadline, (op, rank), |r| r.complete)?;
        }
        let all: Vec<Arc<Deposit>> = r.slots.iter().flatten().cloned().collect();
        r.read[rank] = true;
        if r.read.iter().all(|&done| done) {
            r.slots.iter_mut().for_each(|s| *s = None);
            r.read.iter_mut().for_each(|done| *done = false);
            (r.deposited, r.complete) = (0, false);
            self.changed.notify_all();
        }
        drop(r);
        if let Some((from, d)) = all
            .iter()
            .enumerate()
            .find(|(_, d)| d.op != op || d.root != root)
        {
            return Err(CollectiveError::Mismatch {
                op,
                rank,
                detail: format!(
                    "rank {from} called {} (root {}) while this rank called {op} (root {root})",
                    d.op, d.root
                ),
            });
        }
        Ok(all)
    }

    /// Every rank's single part (all-reduce, all-gather).
    fn exchange_one(
        &self,
        op: &'static str,
        rank: usize,
        mine: CpuTensor,
    ) -> Result<Vec<Arc<Deposit>>, CollectiveError> {
        self.exchange(
            rank,
            Deposit {
                op,
                root: 0,
                parts: vec![mine],
            },
        )
    }
}

/// The first part of each deposit (operations that deposit exactly one).
fn firsts(all: &[Arc<Deposit>]) -> Vec<&CpuTensor> {
    all.iter().filter_map(|d| d.parts.first()).collect()
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
        let all = self
            .group
            .exchange_one("all_reduce", self.rank, t.clone())?;
        sum_in_rank_order("all_reduce", self.rank, t, &firsts(&all))
    }

    fn all_gather_cols(&self, _: &CpuBackend, t: CpuTensor) -> Result<CpuTensor, CollectiveError> {
        let all = self.group.exchange_one("all_gather", self.rank, t)?;
        concat_cols("all_gather", self.rank, &firsts(&all))
    }

    fn all_to_all(
        &self,
        _: &CpuBackend,
        chunks: Vec<CpuTensor>,
    ) -> Result<Vec<CpuTensor>, CollectiveError> {
        let (op, rank, world) = ("all_to_all", self.rank, self.group.world);
        // Deposited even when malformed, so every rank fails the round at once (no timeouts).
        let mine = Deposit {
            op,
            root: 0,
            parts: chunks,
        };
        let all = self.group.exchange(rank, mine)?;
        for (from, d) in all.iter().enumerate() {
            check_chunk_count(op, rank, from, d.parts.len(), world)?;
        }
        Ok(all.iter().map(|d| d.parts[rank].clone()).collect())
    }

    fn broadcast(
        &self,
        _: &CpuBackend,
        t: &mut CpuTensor,
        root: usize,
    ) -> Result<(), CollectiveError> {
        let (op, rank) = ("broadcast", self.rank);
        check_root(op, rank, root, self.group.world)?;
        // Only the root's tensor travels; the others deposit nothing but their view of the root.
        let parts = if rank == root {
            vec![t.clone()]
        } else {
            Vec::new()
        };
        let all = self.group.exchange(rank, Deposit { op, root, parts })?;
        if rank != root {
            *t = all[root].parts[0].clone();
        }
        Ok(())
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

    /// Runs `body(rank, member)` on `world` threads and returns their results by rank.
    fn on_threads<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        body: impl Fn(usize, InProcessRank) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let group = InProcessGroup::new(world, timeout);
        let body = Arc::new(body);
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (member, body) = (group.member(rank), Arc::clone(&body));
                std::thread::spawn(move || body(rank, member))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_and_all_gather_across_threads_many_rounds() {
        on_threads(3, Duration::from_secs(5), |rank, member| {
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
        });
    }

    /// Rank `s` sends rank `d` a chunk of `(s + d) % 3` rows (some empty) holding `10 s + d`.
    fn uneven_chunks(rank: usize, world: usize) -> Vec<CpuTensor> {
        (0..world)
            .map(|d| {
                let rows = (rank + d) % 3;
                t(vec![(10 * rank + d) as f32; rows * 2], 2)
            })
            .collect()
    }

    #[test]
    fn all_to_all_delivers_uneven_and_empty_chunks_by_source_rank() {
        let world = 3;
        on_threads(world, Duration::from_secs(5), move |rank, member| {
            for _ in 0..20 {
                let got = member
                    .all_to_all(&CpuBackend, uneven_chunks(rank, world))
                    .unwrap();
                assert_eq!(got.len(), world);
                for (s, c) in got.iter().enumerate() {
                    assert_eq!((c.rows, c.cols), ((s + rank) % 3, 2), "from rank {s}");
                    assert!(c.data.iter().all(|&v| v == (10 * s + rank) as f32));
                }
            }
        });
    }

    #[test]
    fn broadcast_from_each_root() {
        on_threads(3, Duration::from_secs(5), |rank, member| {
            for root in [2, 0, 1] {
                // Non-roots start with a tensor of another shape: the root's replaces it.
                let mut x = if rank == root {
                    t(vec![root as f32 + 0.5; 6], 3)
                } else {
                    t(vec![-1.0], 1)
                };
                member.broadcast(&CpuBackend, &mut x, root).unwrap();
                assert_eq!((x.rows, x.cols), (2, 3));
                assert_eq!(x.data, vec![root as f32 + 0.5; 6]);
            }
        });
    }

    #[test]
    fn disagreements_fail_every_rank_without_waiting() {
        let started = Instant::now();
        let errs = on_threads(2, Duration::from_secs(30), |rank, member| {
            let mut x = t(vec![1.0], 1);
            // Rank 0 names root 0, rank 1 names root 1.
            member.broadcast(&CpuBackend, &mut x, rank).unwrap_err()
        });
        assert!(
            errs.iter().all(|e| e.to_string().contains("root")),
            "{errs:?}"
        );
        let errs = on_threads(2, Duration::from_secs(30), |rank, member| {
            let n = if rank == 0 { 2 } else { 1 };
            member
                .all_to_all(&CpuBackend, uneven_chunks(rank, n))
                .unwrap_err()
        });
        assert!(
            errs.iter()
                .all(|e| e.to_string().contains("1 chunks for a world of 2")),
            "{errs:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_missing_peer_is_a_timeout_naming_it_not_a_hang() {
        let group = InProcessGroup::new(3, Duration::from_millis(100));
        let member = group.member(0);
        let err = member
            .all_to_all(&CpuBackend, uneven_chunks(0, 3))
            .unwrap_err();
        match &err {
            CollectiveError::Timeout {
                op: "all_to_all",
                rank: 0,
                peers,
                ..
            } => assert_eq!(peers, &[1, 2]),
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("waiting for ranks 1, 2"), "{err}");
        let group = InProcessGroup::new(2, Duration::from_millis(100));
        let mut x = t(vec![1.0], 1);
        let err = group
            .member(1)
            .broadcast(&CpuBackend, &mut x, 0)
            .unwrap_err();
        assert!(
            matches!(err, CollectiveError::Timeout { op: "broadcast", rank: 1, ref peers, .. } if peers == &[0]),
            "{err}"
        );
    }
}
