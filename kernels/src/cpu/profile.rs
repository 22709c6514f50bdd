//! Opt-in wall-clock profile of the CPU backend's operations.
//!
//! When a roofline falls short, the question is where the time goes: weight streaming in the
//! matrix kernels, or everything around them (norms, attention, routing, thread hand-offs). While
//! [`enable`]d, every backend operation adds its wall time to a per-operation (and, for matrix
//! products, per-shape) total; [`take`] returns and clears them. Disabled, the cost is one relaxed
//! atomic load per operation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<String, (u64, Duration)>> = Mutex::new(BTreeMap::new());

/// Total time of one operation (or one operation at one shape).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpTime {
    pub op: String,
    pub calls: u64,
    pub seconds: f64,
}

/// Starts or stops recording.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The totals recorded since the last call, largest first; clears them.
pub fn take() -> Vec<OpTime> {
    let totals = std::mem::take(&mut *TOTALS.lock().unwrap_or_else(PoisonError::into_inner));
    let mut out: Vec<OpTime> = totals
        .into_iter()
        .map(|(op, (calls, d))| OpTime {
            op,
            calls,
            seconds: d.as_secs_f64(),
        })
        .collect();
    out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    out
}

/// Microseconds of one empty parallel region over the compute pool, called from outside it as the
/// model's step is (best of five batches of 200): the fixed cost of every parallel kernel call.
pub fn fork_join_us() -> f64 {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..200 {
                (0..threads).into_par_iter().for_each(|i| {
                    std::hint::black_box(i);
                });
            }
            t.elapsed().as_secs_f64() * 1e6 / 200.0
        })
        .fold(f64::INFINITY, f64::min)
}

/// Adds its lifetime to `key`'s total when dropped.
pub(crate) struct Scope {
    key: String,
    started: Instant,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let d = self.started.elapsed();
        let mut totals = TOTALS.lock().unwrap_or_else(PoisonError::into_inner);
        let e = totals.entry(std::mem::take(&mut self.key)).or_default();
        e.0 += 1;
        e.1 += d;
    }
}

/// A timer for `op` (with `detail()` appended, e.g. a shape), or `None` while disabled.
#[inline]
pub(crate) fn scope(op: &'static str, detail: impl FnOnce() -> String) -> Option<Scope> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let d = detail();
    Some(Scope {
        key: if d.is_empty() {
            op.to_string()
        } else {
            format!("{op} {d}")
        },
        started: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_record_only_while_enabled() {
        // Other tests may run backend ops concurrently: look only at this test's key.
        let key = "profile-test-op";
        drop(scope(key, String::new));
        enable(true);
        drop(scope(key, String::new));
        drop(scope(key, String::new));
        enable(false);
        drop(scope(key, String::new));
        let got = take();
        let mine = got.iter().find(|t| t.op == key).expect("recorded");
        assert_eq!(mine.calls, 2);
    }
}
