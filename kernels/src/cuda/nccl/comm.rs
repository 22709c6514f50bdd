//! The communicator: joining a group with a deadline, waiting for operations with a deadline,
//! aborting on failure, and tearing down.
//!
//! Every communicator is nonblocking (`ncclConfig_t.blocking = 0`): NCCL's calls return at once,
//! possibly with `ncclInProgress`, and this module polls `ncclCommGetAsyncError` (and, for an
//! enqueued operation, a CUDA event recorded after it) until it is done, NCCL reports an error, or
//! the deadline passes. On an error or at the deadline the communicator is aborted
//! (`ncclCommAbort`, which NCCL allows at any point only for nonblocking communicators), which
//! also stops its kernels still waiting on the device, and it is marked unusable. With a blocking
//! communicator a peer that never joins or stalls would hold the caller inside NCCL forever.

use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;

use super::ffi::{self, Config, IN_PROGRESS, Lib, NcclResult, RawComm, RawStream, SUCCESS};
use crate::BackendError;
use crate::cuda::device::CudaBackend;
use crate::cuda::nccl_types::{NcclError, NcclId, NcclVersion};

/// The longest a dropped communicator waits for `ncclCommFinalize` before aborting instead:
/// finalizing waits for the peers, which may be gone.
const FINALIZE_LIMIT: Duration = Duration::from_secs(10);

/// One rank's membership in an NCCL group, on the device of the [`CudaBackend`] it was made
/// for. Operations (`all_reduce_sum`, `all_gather_cols`, `all_to_all`, `broadcast`) take that
/// backend's tensors and run on its stream; each returns once its result is on the device, or
/// fails after the communicator's timeout. NCCL communicators are not thread-safe, so calls are
/// serialised by a lock.
pub struct NcclComm {
    pub(super) rank: usize,
    pub(super) world: usize,
    pub(super) timeout: Duration,
    pub(super) lib: &'static Lib,
    state: Mutex<State>,
    // Released after the communicator (Drop runs first): NCCL's buffers live in this context.
    ctx: Arc<CudaContext>,
}

pub(super) struct State {
    /// Null once aborted (or destroyed).
    comm: RawComm,
    /// Why the communicator was aborted.
    failure: Option<String>,
}

// SAFETY: the handle is only used with the lock held (or in Drop, with `&mut self`), so NCCL sees
// one thread at a time on a communicator, which is all it asks; it has no thread affinity.
unsafe impl Send for State {}

/// What polling `ncclCommGetAsyncError` ended with.
enum Polled {
    Done,
    Failed(NcclResult),
    TimedOut,
}

/// Polls `comm`'s asynchronous state until it leaves `ncclInProgress` or `deadline` passes.
fn poll(lib: &Lib, comm: RawComm, deadline: Instant) -> Polled {
    let backoff = Backoff::new();
    loop {
        let mut state = SUCCESS;
        // SAFETY: `comm` is a live communicator (callers hold it and have not aborted it) and
        // `state` is a valid place for the one result NCCL writes.
        let ret = unsafe { (lib.comm_get_async_error)(comm, &mut state) };
        match (ret, state) {
            (SUCCESS, SUCCESS) => return Polled::Done,
            (SUCCESS, IN_PROGRESS) if Instant::now() < deadline => backoff.pause(),
            (SUCCESS, IN_PROGRESS) => return Polled::TimedOut,
            (SUCCESS, failed) | (failed, _) => return Polled::Failed(failed),
        }
    }
}

/// Waits that stay cheap both for the microseconds a collective takes on NVLink and for the
/// seconds of a stall: spin, then yield, then sleep briefly.
struct Backoff(Instant);

impl Backoff {
    fn new() -> Self {
        Backoff(Instant::now())
    }

    fn pause(&self) {
        let waited = self.0.elapsed();
        if waited < Duration::from_micros(50) {
            std::hint::spin_loop();
        } else if waited < Duration::from_millis(2) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

impl NcclComm {
    /// Joins the group `id` as `rank` of `world`, on `backend`'s device, within `timeout`.
    ///
    /// Every rank calls this with the same id and world (any order, any process); it returns
    /// once all have joined. A rank that has not joined by the deadline makes it fail with
    /// [`NcclError::Timeout`] (`op` = "init") after aborting; without NCCL it is
    /// `NcclError::Backend(CudaNotAvailable("libnccl.so.2 not found ..."))`. Two ranks on one GPU
    /// are refused by NCCL before 2.30 and need `NCCL_MULTI_RANK_GPU_ENABLE=1` (experimental)
    /// after. `timeout` is also the deadline of every later operation.
    pub fn new(
        backend: &CudaBackend,
        id: &NcclId,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, NcclError> {
        const OP: &str = "init";
        let lib = ffi::lib()?;
        let (Ok(rank_c), Ok(world_c)) = (i32::try_from(rank), i32::try_from(world)) else {
            return Err(BackendError::invalid(OP, format!("rank {rank} of {world}")).into());
        };
        if rank >= world {
            return Err(
                BackendError::invalid(OP, format!("rank {rank} is not a rank of {world}")).into(),
            );
        }
        backend
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::device(OP, e))?;
        let deadline = Instant::now() + timeout;
        let mut config = Config::nonblocking();
        let mut comm: RawComm = ptr::null_mut();
        let unique = ffi::UniqueId { internal: id.0 };
        // SAFETY: `comm` and `config` are valid for the call (NCCL copies the config); the id is
        // passed by value as the prototype says. The device is the context's, bound just above:
        // NCCL takes the calling thread's current device.
        let ret =
            unsafe { (lib.comm_init_rank_config)(&mut comm, world_c, unique, rank_c, &mut config) };
        let this = NcclComm {
            rank,
            world,
            timeout,
            lib,
            state: Mutex::new(State {
                comm,
                failure: None,
            }),
            ctx: backend.ctx.clone(),
        };
        let mut state = this.lock(OP)?;
        if ret != SUCCESS && ret != IN_PROGRESS {
            let detail = format!(
                "ncclCommInitRankConfig: {}",
                lib.describe(ret, ptr::null_mut())
            );
            return Err(this.fail(&mut state, OP, detail));
        }
        if state.comm.is_null() {
            return Err(this.fail(&mut state, OP, "NCCL returned no communicator".into()));
        }
        this.settle(&mut state, OP, deadline)?;
        drop(state);
        Ok(this)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The deadline of every operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The NCCL library in use.
    pub fn version(&self) -> NcclVersion {
        self.lib.version
    }

    /// `false` once an operation failed and the communicator was aborted.
    pub fn is_usable(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.failure.is_none())
            .unwrap_or(false)
    }

    fn lock(&self, op: &'static str) -> Result<MutexGuard<'_, State>, NcclError> {
        self.state.lock().map_err(|_| NcclError::Unusable {
            op,
            rank: self.rank,
            cause: "a thread panicked inside an earlier operation".into(),
        })
    }

    /// Starts operation `op` with `backend`'s tensors: checks the communicator is usable and the
    /// backend is on its device, and binds the device to this thread.
    pub(super) fn begin<'a>(
        &'a self,
        op: &'static str,
        backend: &'a CudaBackend,
    ) -> Result<Call<'a>, NcclError> {
        let state = self.lock(op)?;
        if let Some(cause) = &state.failure {
            return Err(NcclError::Unusable {
                op,
                rank: self.rank,
                cause: cause.clone(),
            });
        }
        if backend.ctx.cu_ctx() != self.ctx.cu_ctx() {
            return Err(BackendError::invalid(
                op,
                format!(
                    "tensors of device {} passed to a communicator of device {}",
                    backend.ctx.ordinal(),
                    self.ctx.ordinal()
                ),
            )
            .into());
        }
        backend
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::device(op, e))?;
        Ok(Call {
            op,
            comm: self,
            state,
            b: backend,
            deadline: Instant::now() + self.timeout,
        })
    }

    /// Aborts the communicator, remembers why, and returns the error for `detail`.
    fn fail(&self, state: &mut State, op: &'static str, detail: String) -> NcclError {
        self.fail_with(
            state,
            NcclError::Failed {
                op,
                rank: self.rank,
                detail,
            },
        )
    }

    fn fail_with(&self, state: &mut State, err: NcclError) -> NcclError {
        let comm = std::mem::replace(&mut state.comm, ptr::null_mut());
        if !comm.is_null() {
            // SAFETY: `comm` is live and no other thread is inside NCCL with it (the lock is
            // held), which is what ncclCommAbort requires; it is never used again (nulled above).
            // Its result is ignored: the communicator is gone either way.
            let _ = unsafe { (self.lib.comm_abort)(comm) };
        }
        state.failure.get_or_insert_with(|| err.to_string());
        err
    }

    /// Waits for a nonblocking call on the communicator to take effect (init, or an enqueue that
    /// returned `ncclInProgress`).
    fn settle(
        &self,
        state: &mut State,
        op: &'static str,
        deadline: Instant,
    ) -> Result<(), NcclError> {
        match poll(self.lib, state.comm, deadline) {
            Polled::Done => Ok(()),
            Polled::Failed(code) => {
                let detail = self.lib.describe(code, state.comm);
                Err(self.fail(state, op, detail))
            }
            Polled::TimedOut => Err(self.fail_with(
                state,
                NcclError::Timeout {
                    op,
                    rank: self.rank,
                    timeout: self.timeout,
                },
            )),
        }
    }
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("timeout", &self.timeout)
            .field("device", &self.ctx.ordinal())
            // try_lock: Debug may run while this thread is inside an operation.
            .field(
                "usable",
                &self.state.try_lock().ok().map(|s| s.failure.is_none()),
            )
            .finish()
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let comm = std::mem::replace(&mut state.comm, ptr::null_mut());
        if comm.is_null() {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // Finalize (flush outstanding work, agree with the peers), then destroy; abort instead if
        // that fails or takes too long, e.g. because the peers are gone.
        let deadline = Instant::now() + self.timeout.min(FINALIZE_LIMIT);
        // SAFETY: `comm` is live and exclusively ours (`&mut self`); after this block it is
        // released exactly once, by destroy or abort.
        unsafe {
            let ret = (self.lib.comm_finalize)(comm);
            let finalized = (ret == SUCCESS || ret == IN_PROGRESS)
                && matches!(poll(self.lib, comm, deadline), Polled::Done);
            if finalized {
                let _ = (self.lib.comm_destroy)(comm);
            } else {
                let _ = (self.lib.comm_abort)(comm);
            }
        }
    }
}

/// One operation in progress: holds the communicator's lock and the deadline.
pub(super) struct Call<'a> {
    pub op: &'static str,
    pub b: &'a CudaBackend,
    comm: &'a NcclComm,
    state: MutexGuard<'a, State>,
    deadline: Instant,
}

impl Call<'_> {
    pub fn rank(&self) -> usize {
        self.comm.rank
    }

    pub fn world(&self) -> usize {
        self.comm.world
    }

    pub fn lib(&self) -> &'static Lib {
        self.comm.lib
    }

    pub fn raw(&self) -> RawComm {
        self.state.comm
    }

    pub fn stream(&self) -> RawStream {
        self.b.stream.cu_stream().cast()
    }

    /// Checks the result of an enqueueing call: `ncclInProgress` is waited out (the kernels are
    /// not on the stream before that), an error aborts.
    pub fn enqueued(&mut self, what: &str, ret: NcclResult) -> Result<(), NcclError> {
        match ret {
            SUCCESS => Ok(()),
            IN_PROGRESS => self.comm.settle(&mut self.state, self.op, self.deadline),
            code => {
                let detail = format!("{what}: {}", self.comm.lib.describe(code, self.raw()));
                Err(self.comm.fail(&mut self.state, self.op, detail))
            }
        }
    }

    /// A failure outside NCCL (an allocation, a copy) in the middle of the operation: the peers
    /// are now out of step with this rank, so the communicator is aborted too.
    pub fn device_error(&mut self, e: impl std::fmt::Display) -> NcclError {
        let detail = format!("device error: {e}");
        self.comm.fail(&mut self.state, self.op, detail)
    }

    /// Ranks disagree about the operation: abort, since peers may already be inside NCCL.
    pub fn mismatch(&mut self, detail: String) -> NcclError {
        let err = NcclError::Mismatch {
            op: self.op,
            rank: self.comm.rank,
            detail,
        };
        self.comm.fail_with(&mut self.state, err)
    }

    /// Waits until everything queued on the stream so far (the operation included) has finished,
    /// NCCL reports an error, or the deadline passes.
    pub fn wait(&mut self) -> Result<(), NcclError> {
        let event = match self.b.stream.record_event(None) {
            Ok(e) => e,
            Err(e) => return Err(self.device_error(format!("{e:?}"))),
        };
        let backoff = Backoff::new();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.device_error(format!("{e:?}"))),
            }
            // A peer's failure shows here (NCCL's kernels would otherwise wait for it forever);
            // the deadline covers a peer that simply stopped.
            match poll(self.comm.lib, self.state.comm, Instant::now()) {
                Polled::Done | Polled::TimedOut => {}
                Polled::Failed(code) => {
                    let detail = self.comm.lib.describe(code, self.state.comm);
                    return Err(self.comm.fail(&mut self.state, self.op, detail));
                }
            }
            if Instant::now() >= self.deadline {
                let err = NcclError::Timeout {
                    op: self.op,
                    rank: self.comm.rank,
                    timeout: self.comm.timeout,
                };
                return Err(self.comm.fail_with(&mut self.state, err));
            }
            backoff.pause();
        }
    }

    /// Runs `calls` (enqueueing NCCL calls) between `ncclGroupStart` and `ncclGroupEnd`, so
    /// NCCL schedules them together (point-to-point sends and receives, or broadcasts from
    /// several roots, that would deadlock if issued one by one). The group is always closed,
    /// even after an error, since group state is per thread.
    pub fn group(
        &mut self,
        calls: impl FnOnce(&Lib, RawComm, RawStream) -> Result<(), (String, NcclResult)>,
    ) -> Result<(), NcclError> {
        let lib = self.comm.lib;
        // SAFETY: ncclGroupStart only opens this thread's group.
        let start = unsafe { (lib.group_start)() };
        self.enqueued("ncclGroupStart", start)?;
        let inner = calls(lib, self.raw(), self.stream());
        // SAFETY: closes the group opened above (on every path, as NCCL requires).
        let end = unsafe { (lib.group_end)() };
        if let Err((what, code)) = inner {
            return self.enqueued(&what, code);
        }
        self.enqueued("ncclGroupEnd", end)
    }
}
