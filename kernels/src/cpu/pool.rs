//! Recycled activation buffers, so a decode step does not allocate its tensors afresh.
//!
//! Every backend operation returns a new [`CpuTensor`](super::CpuTensor), and a step makes the same
//! tensors with the same sizes as the step before. Large fresh allocations are not free: glibc
//! serves them with `mmap`, so each costs page faults on first touch (hundreds per step at batch
//! 64). A dropped tensor's buffer is kept here instead and handed to the next operation that needs
//! one of about its size.
//!
//! The pool is shared by all threads (a tensor made on one thread may be dropped on another) and
//! bounded, in buffers and in bytes, so a burst of large tensors (a long prefill) does not stay
//! resident afterwards.

use std::sync::{Mutex, PoisonError};

/// Buffers smaller than this are left to the allocator (its small-size caches are fast).
const MIN_BYTES: usize = 16 << 10;
/// Most buffers kept.
const MAX_BUFFERS: usize = 64;
/// Most bytes kept.
const MAX_BYTES: usize = 256 << 20;

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

struct Pool {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

/// A zero-filled buffer of `len` values, recycled when one of a fitting capacity is free (at least
/// `len`, at most four times it, so a small tensor never pins a large buffer).
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    if len * 4 >= MIN_BYTES {
        let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
        let best = pool
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && b.capacity() <= 4 * len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let mut buf = pool.free.swap_remove(i);
            pool.bytes -= buf.capacity() * 4;
            drop(pool);
            buf.clear();
            buf.resize(len, 0.0);
            return buf;
        }
    }
    vec![0.0; len]
}

/// Takes back a buffer that is no longer needed.
pub(crate) fn give(buf: Vec<f32>) {
    let bytes = buf.capacity() * 4;
    if bytes < MIN_BYTES {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if pool.free.len() < MAX_BUFFERS && pool.bytes + bytes <= MAX_BYTES {
        pool.bytes += bytes;
        pool.free.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_reused_zeroed_and_small_ones_are_not_pooled() {
        // Other tests share the pool: use a size nobody else asks for.
        let len = 123_457;
        let mut a = zeroed(len);
        a.iter_mut().for_each(|v| *v = 7.0);
        let ptr = a.as_ptr() as usize;
        give(a);
        let b = zeroed(len - 10);
        assert!(b.iter().all(|v| *v == 0.0) && b.len() == len - 10);
        assert_eq!(b.as_ptr() as usize, ptr, "the buffer came back");
        give(b);
        // Far smaller requests do not take it.
        let c = zeroed(len / 8);
        assert_ne!(c.as_ptr() as usize, ptr);
        let tiny = zeroed(10);
        give(tiny);
    }
}
