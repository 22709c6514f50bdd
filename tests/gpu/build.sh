#!/usr/bin/env bash
# Builds what a GPU session runs on the device machine (which has no Rust toolchain and no
# registry access), into .gpubin/ (ignored by git; pass it in `carry`):
#   tessera        the CLI with the `cuda` feature (tests/gpu.rs starts it; the benchmarks run it)
#   test-gpu       tests/gpu.rs: every fixture on the GPU, --tp 2 on one GPU, serve's model info
#   test-cuda      kernels/tests/cuda.rs: every backend operation against the CPU backend
#   test-cuda_moe  kernels/tests/cuda_moe.rs: routing and the MoE path against the CPU backend
#   test-cuda_prefill kernels/tests/cuda_prefill.rs: the tensor-core prompt attention against the CPU
#   test-nccl      kernels/tests/nccl.rs (when it exists): NCCL collectives
# Binaries are stripped so that all of them fit the 64 MiB the device call carries. Then, on the
# device: `bash tests/gpu/device.sh tests`, `... bench-qwen3`, `... bench-mixtral` (see there).
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpubin/' "$exclude" 2>/dev/null || echo '/.gpubin/' >> "$exclude"
rm -rf .gpubin && mkdir -p .gpubin

# Test executables of one cargo invocation, as "target-name path" lines.
executables() {
    cargo test --release --locked --no-run --message-format=json "$@" 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
'
}

cargo build --release --locked --features cuda --bin tessera
strip -o .gpubin/tessera target/release/tessera
tests=(--test cuda --test cuda_moe --test cuda_prefill --test cuda_graph)
[ -f kernels/tests/nccl.rs ] && tests+=(--test nccl)
cargo test --release --locked --no-run -p tessera-kernels --features cuda "${tests[@]}"
cargo test --release --locked --no-run --features cuda --test gpu --test gpu_graphs --test gpu_memory
while read -r name path; do
    strip -o ".gpubin/test-$name" "$path"
done < <(executables -p tessera-kernels --features cuda "${tests[@]}"; executables --features cuda --test gpu --test gpu_graphs --test gpu_memory)
git rev-parse --short=12 HEAD > .gpubin/COMMIT
git status --porcelain --untracked-files=no | grep -q . && echo "(dirty)" >> .gpubin/COMMIT
ls -la .gpubin
du -sh .gpubin
