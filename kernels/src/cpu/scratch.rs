//! Reusable per-thread scratch buffers, so the per-token path does not allocate.
//!
//! A decode step calls the same kernels with the same sizes over and over; their temporary
//! buffers (widened weight rows, gathered activations, expert partial sums) are taken from a small
//! per-thread pool and returned after use, keeping their capacity. A buffer is taken out of the pool
//! for the duration of the closure rather than borrowed in place, so a nested or re-entrant call on
//! the same thread (a rayon worker that steals another task while it waits) simply takes another
//! buffer instead of finding the pool locked.

use std::cell::RefCell;

/// Buffers kept per thread; more are allocated (and dropped) if a thread needs more at once.
const KEEP: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with an empty buffer whose capacity survives from earlier calls on this thread.
pub(crate) fn with_buf<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    let mut buf = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    buf.clear();
    let r = f(&mut buf);
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEEP {
            p.push(buf);
        }
    });
    r
}

/// [`with_buf`] with the buffer resized to `len` zeros.
pub(crate) fn with_zeroed<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buf(|b| {
        b.resize(len, 0.0);
        f(b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_nesting_gets_a_second_one() {
        let first = with_zeroed(1000, |b| b.as_ptr() as usize);
        let again = with_zeroed(10, |b| {
            assert!(b.iter().all(|v| *v == 0.0));
            b.as_ptr() as usize
        });
        assert_eq!(first, again, "capacity kept between calls");
        with_buf(|outer| {
            outer.push(1.0);
            with_buf(|inner| {
                assert!(inner.is_empty());
                inner.push(2.0);
            });
            assert_eq!(outer, &[1.0]);
        });
    }
}
