#!/usr/bin/env bash
# Fetches NVRTC and ptxas (CUDA 13.0, the version of cudarc's bindings) from PyPI into a cache
# directory and prints the two paths tests need, as shell assignments:
#   TESSERA_NVRTC_LIB=<dir holding libnvrtc.so.13>  TESSERA_PTXAS=<ptxas binary>
# With them, kernels/tests/nvrtc.rs compiles every .cu for every target architecture and assembles
# the PTX on a machine with no GPU and no toolkit. Wheels are unpacked, not pip-installed: nothing
# is imported from Python, and no venv is needed.
set -euo pipefail
dir="${TESSERA_CUDA_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera/cuda-tools-13.0.88}"
lib="$dir/nvidia/cu13/lib"
ptxas="$dir/nvidia/cu13/bin/ptxas"
if [ ! -e "$lib/libnvrtc.so.13" ] || [ ! -x "$ptxas" ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        sudo_=(); [ "$(id -u)" = 0 ] || sudo_=(sudo)
        "${sudo_[@]}" apt-get update -qq >&2
        "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >&2
    fi
    mkdir -p "$dir/wheels"
    echo "fetching NVRTC and ptxas 13.0.88 from PyPI into $dir" >&2
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$dir/wheels" \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88 >&2
    for w in "$dir"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$dir" >&2
    done
    rm -rf "$dir/wheels"
    chmod +x "$ptxas"
fi
echo "TESSERA_NVRTC_LIB=$lib"
echo "TESSERA_PTXAS=$ptxas"
