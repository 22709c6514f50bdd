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

// Tensor-core matrix multiply-accumulate of one warp (PTX `mma.sync.m16n8k8`, tf32 inputs, f32
// accumulators): d[16x8] += a[16x8] * b[8x8]. With g = lane / 4 and t = lane % 4, a lane holds
// a = {A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]}, b = {B[t][g], B[t+4][g]} and
// d = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]}. Operands are f32 bit patterns of which the
// tensor cores read the top 19 bits (tf32), so values with more precision are rounded first
// (`to_tf32`); bf16 values are tf32 values as they are. Every lane of the warp must call it.
// Needs sm_80 (Ampere) or later: the host picks the kernels that use it only there
// (cuda/plan.rs), and for an older target it compiles to a trap.
#ifndef TESSERA_EMULATOR
__device__ __forceinline__ void mma_tf32(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}

// `f` rounded to tf32 (nearest, ties away from zero), as the bit pattern `mma_tf32` takes.
__device__ __forceinline__ u32 to_tf32(float f) {
#if __CUDA_ARCH__ >= 800
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
#else
    return __float_as_uint(f);
#endif
}
#else
// The emulator (tests/cuda-emulator/device.hpp) gathers the warp's fragments and multiplies
// them with the same lane layout, reading only the top 19 bits of each operand as the tensor
// cores do.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    emu_mma_tf32(d, a, b);
}
__device__ __forceinline__ u32 to_tf32(float f) { return emu_to_tf32(f); }
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
