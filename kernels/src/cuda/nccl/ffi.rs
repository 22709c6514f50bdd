//! NCCL's C API, loaded at run time from `libnccl.so.2`: the few functions Tessera calls, resolved
//! all at once when the library is first needed, with the types they take.
//!
//! cudarc has NCCL bindings, but they are not used here because (as of cudarc 0.19) their loader
//! tries `libnccl.so` and `libnccl.so.{9,10,11,12,13,1}`, never `libnccl.so.2`, the only name
//! NCCL's runtime packages install (the `-dev` packages add the `libnccl.so` link): on a machine
//! with just the runtime, cudarc would not find NCCL. They also model `ncclResult_t` as a Rust
//! enum, which a code from a newer library (2.30 added `ncclTimeout`) would make undefined
//! behaviour, and they panic on a missing symbol. Here the result is a plain `c_int`, a missing
//! library or symbol is [`BackendError::CudaNotAvailable`], and the library is never unloaded.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use crate::cuda::nccl_types::{NCCL_ID_BYTES, NcclVersion};
use crate::{BackendError, Result};

/// `ncclResult_t`, kept as the C integer.
pub(super) type NcclResult = c_int;
pub(super) const SUCCESS: NcclResult = 0;
pub(super) const IN_PROGRESS: NcclResult = 7;

/// `ncclComm_t`: an opaque handle.
pub(super) type RawComm = *mut c_void;
/// `cudaStream_t`: the same object as the driver API's `CUstream`.
pub(super) type RawStream = *mut c_void;

/// `ncclDataType_t` values (a C enum, int-sized; stable since NCCL 2.0).
pub(super) const UINT64: c_int = 5;
pub(super) const FLOAT32: c_int = 7;
/// `ncclRedOp_t`'s `ncclSum`.
pub(super) const SUM: c_int = 0;

/// `ncclUniqueId`: passed by value, as in C.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct UniqueId {
    pub internal: [u8; NCCL_ID_BYTES],
}

/// The oldest layout of `ncclConfig_t` with the fields set here (NCCL 2.25's first ten fields).
///
/// NCCL reads `size` bytes of it and gives every field added after `version` its default
/// (`parseCommConfig` in NCCL's `init.cc`), so this smaller struct is valid for every later
/// library; older ones read only the fields they know. Unset fields hold NCCL's "undefined"
/// markers, as `NCCL_CONFIG_INITIALIZER` does: zero would be an explicit (and invalid) value.
#[repr(C)]
pub(super) struct Config {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
    traffic_class: c_int,
}

/// `NCCL_CONFIG_UNDEF_INT`.
const UNDEF_INT: c_int = c_int::MIN;

impl Config {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every call on the communicator returns at
    /// once (possibly `ncclInProgress`), so a rank that never joins or stalls can be waited for
    /// with a deadline and aborted, where a blocking communicator would hang inside NCCL.
    pub fn nonblocking() -> Self {
        Config {
            size: std::mem::size_of::<Config>(),
            magic: 0xcafe_beef,
            // NCCL_VERSION(2, 25, 0): the layout above.
            version: 22500,
            blocking: 0,
            cga_cluster_size: UNDEF_INT,
            min_ctas: UNDEF_INT,
            max_ctas: UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: UNDEF_INT,
            traffic_class: UNDEF_INT,
        }
    }
}

/// The oldest NCCL accepted: nonblocking communicators and `ncclCommFinalize` came in 2.14, the
/// config layout with `splitShare` in 2.18.
pub(super) const MIN_VERSION: NcclVersion = NcclVersion {
    major: 2,
    minor: 18,
    patch: 0,
};

/// The file names tried, in order: the runtime's SONAME first, then the development link.
const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

type Fn1 = unsafe extern "C" fn(RawComm) -> NcclResult;

/// The loaded library and the functions Tessera calls (prototypes as in `nccl.h`).
pub(super) struct Lib {
    pub version: NcclVersion,
    pub get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    pub comm_init_rank_config:
        unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int, *mut Config) -> NcclResult,
    pub comm_get_async_error: unsafe extern "C" fn(RawComm, *mut NcclResult) -> NcclResult,
    pub comm_abort: Fn1,
    pub comm_finalize: Fn1,
    pub comm_destroy: Fn1,
    pub get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    pub get_last_error: unsafe extern "C" fn(RawComm) -> *const c_char,
    pub all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        RawStream,
    ) -> NcclResult,
    pub all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        RawComm,
        RawStream,
    ) -> NcclResult,
    pub broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        RawStream,
    ) -> NcclResult,
    pub send:
        unsafe extern "C" fn(*const c_void, usize, c_int, c_int, RawComm, RawStream) -> NcclResult,
    pub recv:
        unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, RawStream) -> NcclResult,
    pub group_start: unsafe extern "C" fn() -> NcclResult,
    pub group_end: unsafe extern "C" fn() -> NcclResult,
    // Kept so the functions above stay valid; never dropped (the `OnceLock` is a static).
    _lib: libloading::Library,
}

/// NCCL, loaded on first use; `CudaNotAvailable` naming what is missing when it cannot be.
pub(super) fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load)
        .as_ref()
        .map_err(|e| BackendError::CudaNotAvailable(e.clone()))
}

fn load() -> std::result::Result<Lib, String> {
    let mut errors = Vec::new();
    let mut found = None;
    for name in NAMES {
        // SAFETY: opening a shared library runs its initialisers; NCCL's only set up its own
        // state (every CUDA program that links NCCL runs them at start-up).
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => {
                found = Some((name, lib));
                break;
            }
            Err(e) => errors.push(with_source(&e)),
        }
    }
    let Some((name, lib)) = found else {
        return Err(format!(
            "libnccl.so.2 not found: NCCL cannot be loaded (tried {}: {}; is the library on the \
             loader's path, e.g. LD_LIBRARY_PATH?)",
            NAMES.join(", "),
            errors.first().map_or("", String::as_str)
        ));
    };
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is NCCL's public function of that name, and the field it is
            // stored in has the prototype `nccl.h` gives it (checked by hand against NCCL
            // 2.18-2.32; these signatures have not changed since 2.14).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| {
                format!(
                    "{name} has no {} ({}): NCCL is too old",
                    $name,
                    with_source(&e)
                )
            })?
        };
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult = sym!("ncclGetVersion");
    let mut code: c_int = 0;
    // SAFETY: ncclGetVersion writes one int through the pointer, which points at `code`.
    let ret = unsafe { get_version(&mut code) };
    if ret != SUCCESS || code <= 0 {
        return Err(format!("{name}: ncclGetVersion failed ({ret})"));
    }
    let version = NcclVersion::from_code(code as u32);
    if version < MIN_VERSION {
        return Err(format!(
            "{name} is NCCL {version}; Tessera needs NCCL {MIN_VERSION} or later"
        ));
    }
    Ok(Lib {
        version,
        get_unique_id: sym!("ncclGetUniqueId"),
        comm_init_rank_config: sym!("ncclCommInitRankConfig"),
        comm_get_async_error: sym!("ncclCommGetAsyncError"),
        comm_abort: sym!("ncclCommAbort"),
        comm_finalize: sym!("ncclCommFinalize"),
        comm_destroy: sym!("ncclCommDestroy"),
        get_error_string: sym!("ncclGetErrorString"),
        get_last_error: sym!("ncclGetLastError"),
        all_reduce: sym!("ncclAllReduce"),
        all_gather: sym!("ncclAllGather"),
        broadcast: sym!("ncclBroadcast"),
        send: sym!("ncclSend"),
        recv: sym!("ncclRecv"),
        group_start: sym!("ncclGroupStart"),
        group_end: sym!("ncclGroupEnd"),
        _lib: lib,
    })
}

/// libloading's error with the loader's message, which its `Display` leaves to `source()`.
fn with_source(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

impl Lib {
    /// NCCL's description of `code`, with the last error message it logged for `comm` (or for
    /// the process when `comm` is null), e.g. "remote process exited or there was a network
    /// error (6): ...".
    pub fn describe(&self, code: NcclResult, comm: RawComm) -> String {
        let text = |p: *const c_char| {
            if p.is_null() {
                return String::new();
            }
            // SAFETY: a non-null pointer from the two functions below is a NUL-terminated string
            // owned by NCCL (static, or per communicator / thread), copied out at once.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        // SAFETY: ncclGetErrorString takes any code and returns a static string.
        let what = text(unsafe { (self.get_error_string)(code) });
        // SAFETY: ncclGetLastError accepts a null communicator (the process's last error) or a
        // live one; callers pass null or a communicator they have not destroyed.
        let last = text(unsafe { (self.get_last_error)(comm) });
        if last.is_empty() {
            format!("{what} ({code})")
        } else {
            format!("{what} ({code}): {}", last.trim_end())
        }
    }
}
