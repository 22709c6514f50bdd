// Shared definitions for every Tessera CUDA kernel. The Rust side concatenates this file in front of
// ops.cu, attention.cu and moe.cu and compiles the result once per process with NVRTC.
//
// No headers are included: NVRTC ships without the C++ standard library, and cuda_bf16.h is not
// guaranteed on its include path, so 16-bit floats travel as raw `unsigned short` bit patterns and
// are widened here.

typedef unsigned int u32;
typedef unsigned short u16;
// Our own name for 64-bit indices: `size_t` needs a header that NVRTC may not provide.
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

// Element types of a weight, as `DType` numbers them on the Rust side (cuda/device.rs).
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float bf16_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// Round to nearest even, as `half::bf16::from_f32` does; NaN stays a (quiet) NaN.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

#ifndef TESSERA_EMULATOR
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else
// The CPU emulator of the tests (tests/cuda-emulator) has no PTX: the host's _Float16, which
// also rounds to nearest even.
__device__ __forceinline__ float f16_to_f32(u16 h) { return emu_f16_to_f32(h); }
__device__ __forceinline__ u16 f32_to_f16(float f) { return emu_f32_to_f16(f); }
#endif

// Element `i` of a weight stored as `dtype`, widened to f32.
__device__ __forceinline__ float load_elem(const void* w, int dtype, u64 i) {
    if (dtype == DT_F32) return ((const float*)w)[i];
    if (dtype == DT_F16) return f16_to_f32(((const u16*)w)[i]);
    return bf16_to_f32(((const u16*)w)[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32.
__device__ float block_sum(float v) {
    __shared__ float red[32];
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // an earlier call may still be reading `red`
    if (lane == 0) red[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        v = lane < warps ? red[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

// Maximum over the block; every thread gets the result. blockDim.x must be a multiple of 32.
__device__ float block_max(float v) {
    __shared__ float red[32];
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        v = lane < warps ? red[lane] : NEG_INF;
        v = warp_max(v);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}
