//! Ranks running as threads of one process, exchanging through shared memory.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tessera_kernels::cpu::{CpuBackend, CpuTensor};

use super::{Collective, CollectiveError, concat_cols, sum_in_rank_order};

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
        sum_in_rank_order("all_reduce", self.rank, t, &all)
    }

    fn all_gather_cols(&self, _: &CpuBackend, t: CpuTensor) -> Result<CpuTensor, CollectiveError> {
        let all = self.group.exchange("all_gather", self.rank, t)?;
        concat_cols("all_gather", self.rank, &all)
    }
}
