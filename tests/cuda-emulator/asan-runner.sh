#!/usr/bin/env bash
# Cargo target runner for the emulated CUDA tests under AddressSanitizer: starts each test binary
# with libasan preloaded (cargo and rustc must not be) and the emulator's NVRTC building kernel
# modules with -fsanitize=address, so a kernel that reads or writes outside a device allocation
# stops with ASan's report naming the kernel's file and line. Use:
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=tests/cuda-emulator/asan-runner.sh \
#       LD_LIBRARY_PATH=$TESSERA_CUDA_EMULATOR_LIB cargo nextest run --features cuda ...
set -euo pipefail
asan="$("${TESSERA_EMU_CXX:-g++}" -print-file-name=libasan.so)"
# Leaks are not the question here (and the Rust test harness leaks on purpose at exit).
export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export TESSERA_EMU_ASAN=1
LD_PRELOAD="$asan${LD_PRELOAD:+:$LD_PRELOAD}" exec "$@"
