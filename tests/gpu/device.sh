#!/usr/bin/env bash
# Runs on the GPU machine (the device tool's `run`, with carry [".gpubin"]), after
# tests/gpu/build.sh here. Writes its logs and results under $OUT (at most 8 files come back:
# the tests share one log).
#   bash tests/gpu/device.sh tests   every CUDA test binary, one test at a time (~ a few minutes)
#   bash tests/gpu/device.sh bench-qwen3     the GPU roofline on a Qwen3-30B-A3B shape (24 of 48
#                                            layers), batch 1 and 64, then a 2048-token prefill
#                                            with the default, paged-attention and cuBLAS-MoE
#                                            kernels (the report's last line)
#   bash tests/gpu/device.sh bench-mixtral   the same on a Mixtral-8x7B shape (8 of 32 layers)
#   bash tests/gpu/device.sh bench-deepseek  the same on DeepSeek-V2-Lite's shape (all 27 layers,
#                                            31 GB): MLA's latent KV cache, then a 2048-token
#                                            prefill in each MLA form, if time is left
#   bash tests/gpu/device.sh all     tests, bench-qwen3 and bench-mixtral in turn, in one call:
#                                    a machine goes back after 30 s idle and each start costs
#                                    minutes of the session's 15, so one call is the cheapest;
#                                    what finished comes back even if the call runs out of time
#   bash tests/gpu/device.sh profile-qwen3   Nsight Systems over a short batch-1 run of the
#                                            Qwen3 shape (8 layers), if the machine has nsys:
#                                            per-kernel GPU time and the host's CUDA API time,
#                                            which tell launch-bound steps from GPU-bound ones
# Benchmark checkpoints are generated on the machine (nothing is downloaded): in /dev/shm when it
# has room (a container's may be small), else on the disk under /tmp.
set -uo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-tests}"
out="${OUT:-/tmp/tessera-gpu-out}"
mkdir -p "$out"
# The binaries were built in /work/main: the paths compiled into them (fixtures, the tessera
# executable) must resolve here too.
if [ "$(pwd -P)" != "$(readlink -f /work/main 2>/dev/null)" ]; then
    mkdir -p /work && ln -sfn "$(pwd -P)" /work/main
fi
mkdir -p target/release && cp .gpubin/tessera target/release/tessera
# CUDA 13 libraries: the toolkit's, and NCCL from the Python wheels the image ships.
libs=/usr/local/cuda/lib64
for d in $(python3 -c 'import nvidia, os; r = os.path.dirname(nvidia.__path__[0] + "/"); print(" ".join(os.path.join(r, p, "lib") for p in os.listdir(r)))' 2>/dev/null); do
    [ -d "$d" ] && libs="$libs:$d"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Once per call (`all` runs this script again for each part).
[ -f "$out/env.txt" ] || {
    echo "commit: $(cat .gpubin/COMMIT 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
    ls /usr/local/cuda/lib64 | grep -E 'libcublas.so|libnvrtc.so' | head
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
} > "$out/env.txt" 2>&1
# A folder with room for `$1` bytes: /dev/shm (memory) if it has them, else /tmp (disk).
scratch() {
    local d avail
    for d in /dev/shm /tmp; do
        avail=$(df -B1 --output=avail "$d" 2>/dev/null | tail -1 | tr -d ' ')
        if [ -n "$avail" ] && [ "$avail" -gt "$1" ]; then
            echo "$d"
            return
        fi
    done
    echo /tmp
}
case "$mode" in
all)
    status=0
    for m in tests bench-qwen3 bench-mixtral; do
        echo "== $m at $(date +%T)" | tee -a "$out/env.txt"
        bash "$0" "$m" || status=1
    done
    exit $status
    ;;
tests)
    # One log for every binary: only 8 files come back from a call.
    status=0
    for t in .gpubin/test-*; do
        name=$(basename "$t")
        echo "== $name" | tee -a "$out/tests.log"
        RUST_BACKTRACE=1 "$t" --test-threads=1 --nocapture 2>&1 | tee -a "$out/tests.log" | grep -E '^test |SKIPPED|test result|panicked' || true
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
    # A test that finds no GPU passes with SKIPPED: on this machine only the two emulator-counter
    # tests and what one GPU cannot do (two NCCL ranks) should say so.
    skipped=$(grep -o 'SKIPPED: [A-Za-z0-9_]*:' "$out/tests.log" | wc -l)
    echo "skipped: $skipped tests (the reasons are in tests.log)" |
        tee -a "$out/tests.log"
    exit $status
    ;;
bench-qwen3 | bench-mixtral | bench-deepseek)
    # One model per call: generating, loading and decoding one takes a few minutes, and each
    # device call has ten.
    # bytes: the checkpoint's size in bf16 with some room to spare.
    case "$mode" in
    bench-qwen3) shape=(--model-size qwen3-30b-a3b --layers 24) name=qwen3-30b-a3b-24l bytes=34000000000 ;;
    bench-mixtral) shape=(--model-size mixtral-8x7b --layers 8) name=mixtral-8x7b-8l bytes=26000000000 ;;
    *) shape=(--model-size deepseek-v2-lite) name=deepseek-v2-lite bytes=34000000000 ;;
    esac
    dir="$(scratch $bytes)/$name"
    echo "checkpoint: $dir" >> "$out/env.txt"
    target/release/tessera bench --roofline --device cuda --batches 1,64 --tokens 32 --rounds 3 \
        --json "${shape[@]}" --checkpoint-dir "$dir" \
        > "$out/bench-$name.json" 2> "$out/bench-$name.log"
    status=$?
    if [ "$mode" = bench-deepseek ]; then
        # MLA's two forms on one 2048-token prompt: prefill/s absorbed against expanded.
        for form in absorbed expanded; do
            target/release/tessera bench --roofline --device cuda --batches 1 --tokens 2 \
                --rounds 1 --warmup 1 --prompt-len 2048 --mla-prefill $form --json \
                --prefill-compare-len 0 \
                "${shape[@]}" --checkpoint-dir "$dir" \
                > "$out/prefill-$form.json" 2>> "$out/bench-$name.log" || status=$?
        done
    fi
    rm -rf "$dir"
    tail -5 "$out/bench-$name.log"
    exit $status
    ;;
profile-qwen3)
    nsys=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
    if [ -z "$nsys" ]; then
        echo "no nsys on this machine: nothing to profile with" | tee "$out/profile.txt"
        exit 2
    fi
    name=qwen3-30b-a3b-8l
    dir="$(scratch 12000000000)/$name"
    "$nsys" profile --trace=cuda --sample=none --force-overwrite=true -o "/tmp/$name" \
        target/release/tessera bench --roofline --device cuda --batches 1 --tokens 16 --rounds 1 \
        --model-size qwen3-30b-a3b --layers 8 --checkpoint-dir "$dir" \
        > "$out/profile-bench.txt" 2>&1
    status=$?
    "$nsys" stats --report cuda_gpu_kern_sum,cuda_api_sum,cuda_gpu_mem_time_sum \
        "/tmp/$name.nsys-rep" > "$out/profile.txt" 2>&1
    rm -rf "$dir"
    head -60 "$out/profile.txt"
    exit $status
    ;;
*)
    echo "usage: device.sh all|tests|bench-qwen3|bench-mixtral|bench-deepseek|profile-qwen3" >&2
    exit 2
    ;;
esac
