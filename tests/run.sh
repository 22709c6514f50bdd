#!/usr/bin/env bash
# The project's test command (README, and .ci/run calls it): installs what the tests need on a fresh
# machine, checks formatting and lints, then runs every test once.
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything the tests need beyond Rust itself: etcd-server for the membership tests (a real etcd
# on loopback), protobuf-compiler because etcd-client's build script runs `protoc`, prometheus for
# the metrics test (a real Prometheus scrapes a running server and evaluates every dashboard
# query) and for promtool in deploy/validate.sh.
need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto, which etcd's protos import) are in
# libprotobuf-dev, only a recommendation of protobuf-compiler.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
# g++ (C++20) builds the CPU emulator of the CUDA libraries and, through its NVRTC, the kernels.
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
    fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
# Optional features the tests cover. `cuda` builds without a toolkit (cudarc loads CUDA at run
# time), so clippy checks the whole workspace with it too: the worker's device selection names
# the real CUDA backend only in that build.
features=(--features etcd)
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features etcd,cuda -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast "${features[@]}"
else
    cargo test --workspace --locked --no-fail-fast "${features[@]}"
fi
# The CUDA backend's tests: without a GPU each prints "SKIPPED: <reason>" except
# no_gpu_is_a_typed_error, which checks that opening a device fails with CudaNotAvailable naming
# the missing library, and nvrtc, which compiles every kernel with NVRTC for each target
# architecture and assembles the PTX with ptxas (both from PyPI: no GPU, no toolkit needed).
# nccl: NCCL collectives (world of one, several ranks as processes, deadlines); without libnccl.so.2
# no_nccl_is_a_typed_error checks the error names it, and the rest skip.
# Only these test targets, in the dev profile the run above already built the dependencies for.
echo "== CUDA backend tests (GPU tests skipped without a GPU)"
eval "$(bash tests/cuda-tools/fetch.sh)"
export TESSERA_PTXAS
cuda_tests=(-p tessera-kernels --features cuda --locked --no-fail-fast --test cuda --test cuda_moe --test cuda_prefill --test cuda_graph --test nvrtc --test nccl)
if cargo nextest --version >/dev/null 2>&1; then
    LD_LIBRARY_PATH="$TESSERA_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo nextest run "${cuda_tests[@]}"
else
    LD_LIBRARY_PATH="$TESSERA_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test "${cuda_tests[@]}"
fi
# The CUDA backend for real, on the CPU: tests/cuda-emulator provides libcuda, libnvrtc and
# libcublas that run the kernels as host code with CUDA's thread model (barriers, warp shuffles,
# shared memory) and check every copy and GEMM operand against the allocations. Every op against
# the CPU backend (kernels/tests/cuda.rs, cuda_moe.rs) and every fixture end to end against transformers'
# tokens (tests/gpu.rs) run the unchanged backend code; this is no GPU evidence (no PTX, no
# timing), but a kernel or launch bug fails here instead of on a rented GPU. The test binaries run
# under AddressSanitizer (asan-runner.sh), kernels included: an access outside a device allocation
# stops with a report naming the kernel's file and line.
# The emulator's libnccl.so.2 moves NCCL's collectives between processes over loopback: the NCCL
# tests (kernels/tests/nccl.rs) run with two emulated devices, one rank on each, and tests/gpu.rs
# runs `generate --tp 2` through the coordinator's NCCL hand-out.
echo "== CUDA backend tests on the CPU emulator, under AddressSanitizer"
eval "$(bash tests/cuda-emulator/build.sh)"
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/tests/cuda-emulator/asan-runner.sh"
emu_run() { # TESSERA_EMU_DEVICES, then cargo arguments
    local devices="$1"; shift
    if cargo nextest --version >/dev/null 2>&1; then
        TESSERA_EMU_DEVICES="$devices" LD_LIBRARY_PATH="$TESSERA_CUDA_EMULATOR_LIB" cargo nextest run "$@"
    else
        TESSERA_EMU_DEVICES="$devices" LD_LIBRARY_PATH="$TESSERA_CUDA_EMULATOR_LIB" cargo test "$@"
    fi
}
emu_run 1 -p tessera-kernels -p tessera --features cuda --locked --no-fail-fast --test cuda --test cuda_moe --test cuda_prefill --test cuda_graph --test gpu --test gpu_graphs --test gpu_memory
emu_run 2 -p tessera-kernels --features cuda --locked --no-fail-fast --test nccl
unset CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER
# Kubernetes manifests, Grafana dashboard and Dockerfile under deploy/: rendered with kustomize and
# validated offline against Kubernetes' schemas (tools from PyPI into a cached venv), container
# flags checked against the binary the tests just built.
echo "== deploy/validate.sh"
TESSERA_BIN=target/debug/tessera bash deploy/validate.sh
