//! Checks that the CUDA libraries can be loaded before cudarc touches them.
//!
//! cudarc loads each library lazily on its first call and panics if it is missing. The check here
//! uses cudarc's own fallible presence tests (the same list of file names its loaders try), so a
//! machine without a driver or without the toolkit's libraries gets
//! [`BackendError::CudaNotAvailable`] naming the missing library and the names that were tried.
//! NCCL, needed only by multi-GPU groups, has its own probe ([`probe_nccl`]).

use crate::{BackendError, Result};

/// One library the backend needs: what it is for, cudarc's base name, the file name a Linux
/// install of CUDA 13 provides, and its presence test.
struct Lib {
    what: &'static str,
    base: &'static str,
    usual: &'static str,
    present: unsafe fn() -> bool,
}

const LIBS: [Lib; 3] = [
    Lib {
        what: "the CUDA driver",
        base: "cuda",
        usual: "libcuda.so.1",
        present: cudarc::driver::sys::is_culib_present,
    },
    Lib {
        what: "NVRTC (the runtime compiler)",
        base: "nvrtc",
        usual: "libnvrtc.so.13",
        present: cudarc::nvrtc::sys::is_culib_present,
    },
    Lib {
        what: "cuBLAS",
        base: "cublas",
        usual: "libcublas.so.13",
        present: cudarc::cublas::sys::is_culib_present,
    },
];

/// `Ok` when the driver, NVRTC and cuBLAS libraries can all be opened; otherwise
/// `CudaNotAvailable` naming the first one missing (e.g. "libcuda.so.1 not found").
pub fn probe_libraries() -> Result<()> {
    probe(&LIBS)
}

/// `Ok` when NVRTC alone can be opened: enough to compile the kernels, which needs no driver and
/// no GPU (`compile_kernels`).
pub fn probe_nvrtc() -> Result<()> {
    probe(&LIBS[1..2])
}

fn probe(libs: &[Lib]) -> Result<()> {
    for lib in libs {
        // SAFETY: the presence tests only `dlopen` candidate file names and drop the handle; they
        // call no CUDA function. Opening a library runs its initialisers, which for NVIDIA's
        // libraries is what every CUDA program does at start-up.
        if !unsafe { (lib.present)() } {
            let mut tried = cudarc::get_lib_name_candidates(lib.base);
            // cudarc's list repeats some names; keep the first of each, in its order.
            let mut seen = std::collections::HashSet::new();
            tried.retain(|n| seen.insert(n.clone()));
            return Err(BackendError::CudaNotAvailable(format!(
                "{} not found: {} cannot be loaded (tried {}; is the library on the loader's \
                 path, e.g. LD_LIBRARY_PATH?)",
                lib.usual,
                lib.what,
                tried.join(", ")
            )));
        }
    }
    Ok(())
}

/// `Ok` with NCCL's version when `libnccl.so.2` (NCCL 2.18 or later) can be loaded; otherwise
/// `CudaNotAvailable` saying what is missing ("libnccl.so.2 not found: ..."). NCCL is not part of
/// [`probe_libraries`]: a machine without it still runs the backend on one GPU, and only forming
/// an NCCL group fails. NCCL is loaded by Tessera's own loader (`nccl/ffi.rs`), not cudarc's,
/// which does not try `libnccl.so.2`.
pub fn probe_nccl() -> Result<super::NcclVersion> {
    super::nccl::probe()
}
