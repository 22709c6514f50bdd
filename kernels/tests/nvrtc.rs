//! The CUDA kernel sources compile with NVRTC for every architecture the backend targets, and the
//! PTX assembles with `ptxas` for the matching chip.
//!
//! Compiling needs NVRTC only: no driver and no GPU. CI installs NVRTC and ptxas from PyPI
//! (`nvidia-cuda-nvrtc`, `nvidia-cuda-nvcc`, see tests/run.sh) and points `LD_LIBRARY_PATH` and
//! `TESSERA_PTXAS` at them, so a kernel that does not compile fails CI, not a GPU session. Where
//! NVRTC cannot be loaded the test prints `SKIPPED: <reason>`; where `TESSERA_PTXAS` is unset the
//! PTX is checked by NVRTC alone.
#![cfg(feature = "cuda")]

use std::process::Command;

use tessera_kernels::BackendError;
use tessera_kernels::cuda::compile_kernels;

/// Ampere (A100), Ada (L40S), Hopper (H100/H200) and Blackwell (B200).
const ARCHS: [(i32, i32); 4] = [(8, 0), (8, 9), (9, 0), (10, 0)];

#[test]
fn kernels_compile_for_every_target_architecture() {
    for cc in ARCHS {
        let ptx = match compile_kernels(cc) {
            Ok(p) => p,
            Err(BackendError::CudaNotAvailable(reason)) => {
                eprintln!("SKIPPED: kernels_compile_for_every_target_architecture: {reason}");
                return;
            }
            Err(e) => panic!("compute_{}{}: {e}", cc.0, cc.1),
        };
        assert!(
            ptx.contains(&format!(".target sm_{}{}", cc.0, cc.1)),
            "compute_{}{}: PTX for another target",
            cc.0,
            cc.1
        );
        let Some(ptxas) = std::env::var_os("TESSERA_PTXAS") else {
            eprintln!("note: TESSERA_PTXAS unset; PTX not assembled");
            continue;
        };
        let dir = std::env::temp_dir().join(format!("tessera-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join(format!("kernels_sm{}{}.ptx", cc.0, cc.1));
        std::fs::write(&src, &ptx).unwrap();
        let out = Command::new(&ptxas)
            .arg(format!("-arch=sm_{}{}", cc.0, cc.1))
            .arg("-o")
            .arg(dir.join("out.cubin"))
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("running {ptxas:?}: {e}"));
        assert!(
            out.status.success(),
            "ptxas -arch=sm_{}{} failed:\n{}",
            cc.0,
            cc.1,
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
