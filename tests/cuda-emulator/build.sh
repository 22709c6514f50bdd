#!/usr/bin/env bash
# Builds the CPU emulator of the CUDA libraries Tessera loads (libcuda.so, libnvrtc.so,
# libcublas.so, libnccl.so.2; see device.hpp and nccl.cpp for what they check and what they
# cannot) into
# target/cuda-emulator/lib and prints the line to eval:
#   eval "$(bash tests/cuda-emulator/build.sh)"   # sets TESSERA_CUDA_EMULATOR_LIB
# Then LD_LIBRARY_PATH="$TESSERA_CUDA_EMULATOR_LIB" makes `--features cuda` builds run their CUDA
# path on the CPU. Needs a C++20 compiler (g++ 12 or later) at build time and when the emulated
# NVRTC compiles the kernels.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${CARGO_TARGET_DIR:-$root/target}/cuda-emulator/lib"
mkdir -p "$out"
cxx="${TESSERA_EMU_CXX:-g++}"
flags=(-std=c++20 -O2 -march=native -g -fPIC -shared -Wall -Wextra -Wno-unused-parameter)
build() { # name sources...
    local name="$1" lib="$out/$1"; shift
    local newest
    newest=$(ls -t "$@" "$here"/*.sh "$here"/*.hpp | head -1)
    if [ ! -f "$lib" ] || [ "$newest" -nt "$lib" ]; then
        "$cxx" "${flags[@]}" -DTESSERA_EMU_DIR="\"$here\"" -Wl,-soname,"$name" -o "$lib.tmp" "$@" -ldl -pthread
        mv "$lib.tmp" "$lib"
    fi
}
build libcuda.so "$here/driver.cpp"
build libnvrtc.so "$here/nvrtc.cpp"
build libcublas.so "$here/cublas.cpp"
build libnccl.so.2 "$here/nccl.cpp"
# Kernel modules compiled by an older emulator may not match device.hpp any more.
if [ -d "$out/modules" ] && [ "$here/device.hpp" -nt "$out/modules" ]; then rm -rf "$out/modules"; fi
mkdir -p "$out/modules"
echo "TESSERA_CUDA_EMULATOR_LIB='$out'"
