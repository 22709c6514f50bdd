//! The collectives on [`CudaTensor`]s: all-reduce (sum), all-gather by columns, all-to-all with
//! chunks of any shape, and broadcast from a root.
//!
//! NCCL moves contiguous buffers of counts every rank must know in advance. All-reduce has them
//! (every rank holds the same shape), so it is one `ncclAllReduce`. The others first all-gather a
//! small header from every rank (the operation, the root, the shapes it sends) and check them
//! (every rank sees all headers, so ranks that disagree all fail together, each naming the
//! difference), then move the data: all-gather as one `ncclAllGather` when every rank has the same
//! columns, or one `ncclBroadcast` per rank in a group when they differ (the vocabulary split of
//! `lm_head` may be uneven), followed by a strided copy from rank-major blocks into
//! `[rows, Σ cols]`; all-to-all as `ncclSend`/`ncclRecv` pairs in a group; broadcast as one
//! `ncclBroadcast` into a tensor of the root's shape. All-reduce skips the header to stay one
//! round trip on the hot path (twice per layer): ranks that disagree about it are not detected
//! and fail at the deadline instead.

use std::ffi::{c_int, c_void};

use cudarc::driver::sys::{self as cu, CUmemorytype};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::comm::{Call, NcclComm};
use super::ffi::{FLOAT32, IN_PROGRESS, NcclResult, SUCCESS, SUM, UINT64};
use crate::cuda::device::{CudaBackend, CudaTensor};
use crate::cuda::nccl_types::NcclError;

/// Header operation codes (all-reduce has no header).
const ALL_GATHER: u64 = 1;
const ALL_TO_ALL: u64 = 2;
const BROADCAST: u64 = 3;

fn op_name(code: u64) -> &'static str {
    match code {
        ALL_GATHER => "all_gather",
        ALL_TO_ALL => "all_to_all",
        BROADCAST => "broadcast",
        _ => "an unknown operation",
    }
}

/// One rank's header: `[op, root, count, (rows, cols) × world]`, the same length for every
/// operation so that ranks calling different ones still exchange cleanly and see the mismatch.
struct Header {
    op: u64,
    root: u64,
    /// Tensors the rank passed (1, or its chunk count for all-to-all).
    count: u64,
    shapes: Vec<(u64, u64)>,
}

impl Header {
    fn encode(&self, world: usize) -> Vec<u64> {
        let mut v = vec![self.op, self.root, self.count];
        v.extend((0..world).flat_map(|i| {
            let (r, c) = self.shapes.get(i).copied().unwrap_or((0, 0));
            [r, c]
        }));
        v
    }

    fn decode(v: &[u64]) -> Self {
        Header {
            op: v[0],
            root: v[1],
            count: v[2],
            shapes: v[3..].chunks_exact(2).map(|p| (p[0], p[1])).collect(),
        }
    }
}

fn shape(t: &CudaTensor) -> (u64, u64) {
    (t.rows as u64, t.cols as u64)
}

/// Bytes of an f32.
const F32: usize = std::mem::size_of::<f32>();

/// Inside a group: `Err` (for [`Call::group`]) when an enqueueing call failed.
fn failed(ret: NcclResult, what: impl FnOnce() -> String) -> Result<(), (String, NcclResult)> {
    if ret == SUCCESS || ret == IN_PROGRESS {
        Ok(())
    } else {
        Err((what(), ret))
    }
}

/// A device pointer as the `void*` NCCL takes.
fn void(p: cu::CUdeviceptr) -> *mut c_void {
    p as usize as *mut c_void
}

impl Call<'_> {
    /// Exchanges `mine` with every rank; checks that all called the same operation with the same
    /// root and returns every rank's header, by rank.
    fn headers(&mut self, mine: Header) -> Result<Vec<Header>, NcclError> {
        let world = self.world();
        let words = mine.encode(world);
        let n = words.len();
        let send = self.b.upload(self.op, &words);
        let recv = self.b.zeros::<u64>(self.op, n * world);
        let (send, mut recv) = match (send, recv) {
            (Ok(s), Ok(r)) => (s, r),
            (Err(e), _) | (_, Err(e)) => return Err(self.device_error(e)),
        };
        {
            let stream = &self.b.stream;
            let (sp, _s) = send.device_ptr(stream);
            let (rp, _r) = recv.device_ptr_mut(stream);
            let lib = self.lib();
            // SAFETY: `send` holds n u64 and `recv` n × world, both on this communicator's
            // device and alive until `wait` below returns (or the communicator is aborted);
            // the stream is the backend's, on the same device.
            let ret = unsafe {
                (lib.all_gather)(void(sp), void(rp), n, UINT64, self.raw(), self.stream())
            };
            self.enqueued("ncclAllGather", ret)?;
        }
        self.wait()?;
        let all = match self.b.download(self.op, &recv, n * world) {
            Ok(v) => v,
            Err(e) => return Err(self.device_error(e)),
        };
        let all: Vec<Header> = all.chunks_exact(n).map(Header::decode).collect();
        for (r, h) in all.iter().enumerate() {
            if h.op != mine.op || h.root != mine.root {
                return Err(self.mismatch(format!(
                    "rank {r} called {} (root {}) while rank {} called {} (root {})",
                    op_name(h.op),
                    h.root,
                    self.rank(),
                    op_name(mine.op),
                    mine.root
                )));
            }
        }
        Ok(all)
    }
}

impl NcclComm {
    /// Sums `t` over all ranks, in place; every rank receives the sum.
    pub fn all_reduce_sum(&self, b: &CudaBackend, t: &mut CudaTensor) -> Result<(), NcclError> {
        let mut call = self.begin("all_reduce", b)?;
        let n = t.rows * t.cols;
        if n > 0 {
            let (p, _g) = t.data.device_ptr_mut(&b.stream);
            let lib = call.lib();
            // SAFETY: in place over the tensor's n floats (its buffer holds at least n), on the
            // backend's stream; the tensor is borrowed until `wait` returns.
            let ret = unsafe {
                (lib.all_reduce)(void(p), void(p), n, FLOAT32, SUM, call.raw(), call.stream())
            };
            call.enqueued("ncclAllReduce", ret)?;
        }
        call.wait()
    }

    /// Joins every rank's columns in rank order: `[rows, cols_r]` from each rank becomes
    /// `[rows, Σ cols_r]` on every rank. Row counts must agree; column counts may differ.
    pub fn all_gather_cols(&self, b: &CudaBackend, t: CudaTensor) -> Result<CudaTensor, NcclError> {
        let mut call = self.begin("all_gather", b)?;
        let world = call.world();
        let all = call.headers(Header {
            op: ALL_GATHER,
            root: 0,
            count: 1,
            shapes: vec![shape(&t)],
        })?;
        let rows = t.rows;
        if let Some((r, h)) = all
            .iter()
            .enumerate()
            .find(|(_, h)| h.shapes[0].0 != rows as u64)
        {
            return Err(call.mismatch(format!(
                "row counts differ: rank {} has {rows}, rank {r} has {}",
                call.rank(),
                h.shapes[0].0
            )));
        }
        let cols: Vec<usize> = all.iter().map(|h| h.shapes[0].1 as usize).collect();
        let total: usize = cols.iter().sum();
        // Rank-major blocks: rank r's rows × cols[r] floats start at offsets[r].
        let offsets: Vec<usize> = cols
            .iter()
            .scan(0, |acc, c| {
                let at = *acc;
                *acc += rows * c;
                Some(at)
            })
            .collect();
        let mut blocks = match b.tensor(call.op, rows, total) {
            Ok(t) => t,
            Err(e) => return Err(call.device_error(e)),
        };
        if rows * total > 0 {
            let stream = &b.stream;
            let (sp, _s) = t.data.device_ptr(stream);
            let (gp, _g) = blocks.data.device_ptr_mut(stream);
            if cols.iter().all(|&c| c == t.cols) {
                let lib = call.lib();
                // SAFETY: sends this rank's rows × cols floats and receives world times as many
                // into `blocks` (rows × total floats), both alive until `wait` returns.
                let ret = unsafe {
                    (lib.all_gather)(
                        void(sp),
                        void(gp),
                        rows * t.cols,
                        FLOAT32,
                        call.raw(),
                        call.stream(),
                    )
                };
                call.enqueued("ncclAllGather", ret)?;
            } else {
                call.group(|lib, comm, stream| {
                    for r in (0..world).filter(|&r| cols[r] > 0) {
                        let dst = gp + (offsets[r] * F32) as u64;
                        // SAFETY: rank r's block of rows × cols[r] floats lies inside `blocks`
                        // (offsets are prefix sums of the block sizes); root r sends its own
                        // tensor of that size, the others ignore the send pointer.
                        let ret = unsafe {
                            (lib.broadcast)(
                                void(sp),
                                void(dst),
                                rows * cols[r],
                                FLOAT32,
                                r as c_int,
                                comm,
                                stream,
                            )
                        };
                        failed(ret, || format!("ncclBroadcast from rank {r}"))?;
                    }
                    Ok(())
                })?;
            }
        }
        // With one row (decode's usual case) or one rank, rank-major is already row-major.
        let out = if rows > 1 && world > 1 {
            let mut out = match b.tensor(call.op, rows, total) {
                Ok(t) => t,
                Err(e) => return Err(call.device_error(e)),
            };
            if let Err(e) = interleave(b, &blocks, &mut out, rows, &cols, &offsets) {
                return Err(call.device_error(e));
            }
            out
        } else {
            blocks
        };
        call.wait()?;
        drop(t);
        Ok(out)
    }

    /// Sends `chunks[d]` to rank `d` and returns the chunk each rank sent here, by source rank.
    /// Chunks may have any shape, zero rows included; every rank passes exactly one per rank.
    pub fn all_to_all(
        &self,
        b: &CudaBackend,
        mut chunks: Vec<CudaTensor>,
    ) -> Result<Vec<CudaTensor>, NcclError> {
        let mut call = self.begin("all_to_all", b)?;
        let (world, me) = (call.world(), call.rank());
        let all = call.headers(Header {
            op: ALL_TO_ALL,
            root: 0,
            count: chunks.len() as u64,
            shapes: chunks.iter().map(shape).collect(),
        })?;
        if let Some((r, h)) = all
            .iter()
            .enumerate()
            .find(|(_, h)| h.count != world as u64)
        {
            let who = if r == me {
                "this rank".to_string()
            } else {
                format!("rank {r}")
            };
            return Err(call.mismatch(format!(
                "{who} passed {} chunks for a world of {world} (one per rank)",
                h.count
            )));
        }
        // What each source sends here: entry `me` of its header.
        let mut received = Vec::with_capacity(world);
        for (src, h) in all.iter().enumerate() {
            let (rows, cols) = (h.shapes[me].0 as usize, h.shapes[me].1 as usize);
            let t = if src == me {
                // Our own chunk stays where it is; swapped out below.
                b.tensor(call.op, 0, 0)
            } else {
                b.tensor(call.op, rows, cols)
            };
            match t {
                Ok(t) => received.push(t),
                Err(e) => return Err(call.device_error(e)),
            }
        }
        std::mem::swap(&mut received[me], &mut chunks[me]);
        {
            let stream = &b.stream;
            let sends: Vec<_> = chunks.iter().map(|c| c.data.device_ptr(stream)).collect();
            let recvs: Vec<_> = received
                .iter_mut()
                .map(|c| (c.rows * c.cols, c.data.device_ptr_mut(stream)))
                .collect();
            call.group(|lib, comm, stream| {
                for peer in (0..world).filter(|&p| p != me) {
                    let n_send = chunks[peer].rows * chunks[peer].cols;
                    let n_recv = recvs[peer].0;
                    // Zero-sized transfers are skipped on both sides (both know the counts).
                    if n_send > 0 {
                        // SAFETY: chunk `peer` holds n_send floats and stays alive (borrowed by
                        // `sends`) until `wait` returns.
                        let ret = unsafe {
                            (lib.send)(
                                void(sends[peer].0),
                                n_send,
                                FLOAT32,
                                peer as c_int,
                                comm,
                                stream,
                            )
                        };
                        failed(ret, || format!("ncclSend to rank {peer}"))?;
                    }
                    if n_recv > 0 {
                        // SAFETY: the receive tensor for `peer` was allocated with the shape the
                        // peer announced, n_recv floats, and is borrowed until `wait` returns.
                        let ret = unsafe {
                            (lib.recv)(
                                void((recvs[peer].1).0),
                                n_recv,
                                FLOAT32,
                                peer as c_int,
                                comm,
                                stream,
                            )
                        };
                        failed(ret, || format!("ncclRecv from rank {peer}"))?;
                    }
                }
                Ok(())
            })?;
        }
        call.wait()?;
        drop(chunks);
        Ok(received)
    }

    /// Replaces `t` on every rank with rank `root`'s `t`, shape included; the root's stays.
    pub fn broadcast(
        &self,
        b: &CudaBackend,
        t: &mut CudaTensor,
        root: usize,
    ) -> Result<(), NcclError> {
        let mut call = self.begin("broadcast", b)?;
        let all = call.headers(Header {
            op: BROADCAST,
            root: root as u64,
            count: 1,
            shapes: vec![shape(t)],
        })?;
        // Every rank announced the same root (checked by `headers`), so all fail here together.
        if root >= call.world() {
            let world = call.world();
            return Err(call.mismatch(format!("root {root} is not a rank of a world of {world}")));
        }
        let (rows, cols) = all[root].shapes[0];
        let (rows, cols) = (rows as usize, cols as usize);
        if (rows, cols) != (t.rows, t.cols) {
            *t = match b.tensor(call.op, rows, cols) {
                Ok(t) => t,
                Err(e) => return Err(call.device_error(e)),
            };
        }
        let n = rows * cols;
        if n > 0 {
            let (p, _g) = t.data.device_ptr_mut(&b.stream);
            let lib = call.lib();
            // SAFETY: in place over n floats of a tensor of the root's shape, borrowed until
            // `wait` returns; the root sends from the same buffer.
            let ret = unsafe {
                (lib.broadcast)(
                    void(p),
                    void(p),
                    n,
                    FLOAT32,
                    root as c_int,
                    call.raw(),
                    call.stream(),
                )
            };
            call.enqueued("ncclBroadcast", ret)?;
        }
        call.wait()
    }
}

/// Copies rank-major blocks (`rows × cols[r]` at `offsets[r]`) into `out` `[rows, Σ cols]`: one
/// strided 2-D copy per rank on the backend's stream, no kernel needed.
fn interleave(
    b: &CudaBackend,
    blocks: &CudaTensor,
    out: &mut CudaTensor,
    rows: usize,
    cols: &[usize],
    offsets: &[usize],
) -> Result<(), String> {
    let total: usize = cols.iter().sum();
    let stream = &b.stream;
    let (src, _s) = blocks.data.device_ptr(stream);
    let (dst, _d) = out.data.device_ptr_mut(stream);
    let mut col = 0;
    for (r, &c) in cols.iter().enumerate() {
        if c > 0 {
            let copy = cu::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: src + (offsets[r] * F32) as u64,
                srcArray: std::ptr::null_mut(),
                srcPitch: c * F32,
                dstXInBytes: col * F32,
                dstY: 0,
                dstMemoryType: CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: dst,
                dstArray: std::ptr::null_mut(),
                dstPitch: total * F32,
                WidthInBytes: c * F32,
                Height: rows,
            };
            // SAFETY: the source is rank r's rows × c floats inside `blocks`; the destination
            // rows × c floats at column `col` of `out` (rows × total floats, pitch total); both
            // alive until the caller's wait, and the copy is queued on the backend's stream.
            let ret = unsafe { cu::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) };
            if ret != cu::CUresult::CUDA_SUCCESS {
                return Err(format!("cuMemcpy2DAsync for rank {r}'s columns: {ret:?}"));
            }
        }
        col += c;
    }
    Ok(())
}
