// The experts of a large MoE step on the tensor cores (vLLM's "fused MoE" scheme): the plan of
// moe.cu sorts the routed pairs into per-expert slots and cuts them into tiles of up to MMA_TM
// slots of one expert (`moe_plan` with tile_slots = MMA_TM); a block multiplies one tile's rows
// by an MMA_TN-feature slab of its expert's weights, K in chunks of MMA_TK staged in shared
// memory, a warp per 16 rows (`mma_tf32` of prelude.cu: tf32 operands, f32 accumulation). Like
// the SIMT kernels, grids are sized by the host's upper bound of the tile count and blocks past
// the real count exit, so the step needs no copy to the host and one launch per product.
//
// Weights of any dtype are widened to f32 in shared memory (bf16 and f16 values are tf32 values
// as they are; f32 weights are rounded to tf32), activations rounded to tf32: products are
// about as exact as cuBLAS's, which rounds the activations to the weights' 16-bit type.

#define MMA_TM 64   // slots per tile: 4 warps of 16 (MMA_TM of cuda/moe_experts.rs)
#define MMA_TN 64   // output features per block
#define MMA_TK 32   // input features per staged chunk
#define MMA_PAD 4   // floats of padding per staged row: a fragment's 32 loads hit 32 banks
#define MMA_STRIDE (MMA_TK + MMA_PAD)
#define MMA_THREADS 128

// Stages columns [k0, k0 + MMA_TK) of the tile's rows (row m from src_row[m], f32) and of
// MMA_TN weight rows from feature n0 (of length k, in `dtype`) for each of `mats` matrices,
// as tf32 bit patterns; zeros past the tile's rows, past n and past k.
__device__ __forceinline__ void moe_mma_stage(u32* xs, u32* ws, const float* const* src_row,
                                              const char* const* w, int mats, u32 rows, u32 n0,
                                              u32 k0, const GroupedArgs& a) {
    for (u32 i = threadIdx.x; i < MMA_TM * MMA_TK; i += MMA_THREADS) {
        const u32 m = i / MMA_TK, c = i % MMA_TK, k = k0 + c;
        xs[m * MMA_STRIDE + c] = m < rows && k < a.k ? to_tf32(src_row[m][k]) : 0u;
    }
    for (int j = 0; j < mats; j++) {
        for (u32 i = threadIdx.x; i < MMA_TN * MMA_TK; i += MMA_THREADS) {
            const u32 r = i / MMA_TK, c = i % MMA_TK, k = k0 + c, n = n0 + r;
            const float v = n < a.n && k < a.k ? load_elem(w[j], a.dtype, (u64)n * a.k + k) : 0.0f;
            ws[(j * MMA_TN + r) * MMA_STRIDE + c] = to_tf32(v);
        }
    }
}

// acc[j][t][e] += the warp's 16 staged rows times weight matrix j's staged rows (B[k][n] =
// W[n][k]), over the staged chunk, for the MMA_TN / 8 n8 tiles t.
template <int MATS>
__device__ __forceinline__ void moe_mma_chunk(float (&acc)[MATS][MMA_TN / 8][4], const u32* xs,
                                              const u32* ws) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const u32* xw = xs + warp * 16 * MMA_STRIDE;
#pragma unroll
    for (int kk = 0; kk < MMA_TK / 8; kk++) {
        u32 a[4];
#pragma unroll
        for (int i = 0; i < 4; i++) a[i] = xw[(g + 8 * (i & 1)) * MMA_STRIDE + kk * 8 + t4 + 4 * (i >> 1)];
#pragma unroll
        for (int j = 0; j < MATS; j++) {
#pragma unroll
            for (int t = 0; t < MMA_TN / 8; t++) {
                const u32* wr = ws + (j * MMA_TN + t * 8 + g) * MMA_STRIDE + kk * 8 + t4;
                const u32 b[2] = {wr[0], wr[4]};
                mma_tf32(acc[j][t], a, b);
            }
        }
    }
}

// One tile times one feature slab: MATS = 2 is gate and up (rows gathered from x through
// token_of_slot, out = h with silu(gate) * up), MATS = 1 is down (rows of h by slot, out = y).
template <int MATS>
__device__ void moe_mma_body(float* out, const float* src, const u32* token_of_slot,
                             const u32* offsets, const u32* tiles, const u64* table,
                             const GroupedArgs& a) {
    __shared__ __align__(16) u32 xs[MMA_TM * MMA_STRIDE];
    __shared__ __align__(16) u32 ws[MATS * MMA_TN * MMA_STRIDE];
    __shared__ const float* src_row[MMA_TM];
    const MoeTile t = moe_tile(tiles, offsets, MMA_TM);
    const char* w[2];
#pragma unroll
    for (int j = 0; j < MATS; j++) {
        // Gate and up are entries 0 and 1 of the expert's table triple, down is entry 2.
        w[j] = (const char*)table[3 * (u64)t.expert + (MATS == 2 ? j : 2)];
    }
    for (u32 m = threadIdx.x; m < MMA_TM; m += MMA_THREADS) {
        const u32 slot = t.first + min(m, t.rows - 1);
        const u64 row = MATS == 2 ? (u64)token_of_slot[slot] : (u64)slot;
        src_row[m] = src + row * a.k;
    }
    const u32 n0 = blockIdx.y * MMA_TN;
    float acc[MATS][MMA_TN / 8][4];
#pragma unroll
    for (int j = 0; j < MATS; j++) {
#pragma unroll
        for (int i = 0; i < MMA_TN / 8; i++) {
#pragma unroll
            for (int e = 0; e < 4; e++) acc[j][i][e] = 0.0f;
        }
    }
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const bool active = warp * 16 < t.rows;  // warp-uniform: some of its rows are the tile's
    for (u32 k0 = 0; k0 < a.k; k0 += MMA_TK) {
        __syncthreads();  // src_row is written, and the previous chunk's readers are done
        moe_mma_stage(xs, ws, src_row, w, MATS, t.rows, n0, k0, a);
        __syncthreads();
        if (active) moe_mma_chunk<MATS>(acc, xs, ws);
    }
#pragma unroll
    for (int i = 0; i < MMA_TN / 8; i++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const u32 m = warp * 16 + g + 8 * (e >> 1), n = n0 + i * 8 + 2 * t4 + (e & 1);
            if (m < t.rows && n < a.n) {
                float v = acc[0][i][e];
                if (MATS == 2) v = v / (1.0f + expf(-v)) * acc[MATS - 1][i][e];
                out[(u64)(t.first + m) * a.n + n] = v;
            }
        }
    }
}

// h[slot, n] = silu(x_t · gate_e[n]) * (x_t · up_e[n]) for t = token_of_slot[slot]. Grid:
// (max_tiles, ceil(inter / MMA_TN)), MMA_THREADS threads; h holds slots * n floats.
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
    moe_gate_up_mma(float* h, const float* x, const u32* token_of_slot, const u32* offsets,
                    const u32* tiles, const u32* n_tiles, const u64* table, GroupedArgs a) {
    if (blockIdx.x >= *n_tiles) return;  // the whole block: the bound was an upper one
    moe_mma_body<2>(h, x, token_of_slot, offsets, tiles, table, a);
}

// y[slot, n] = h[slot, :] · down_e[n, :]. Grid: (max_tiles, ceil(hidden / MMA_TN)), MMA_THREADS
// threads; y holds slots * n floats, h slots * k.
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
    moe_down_mma(float* y, const float* h, const u32* offsets, const u32* tiles,
                 const u32* n_tiles, const u64* table, GroupedArgs a) {
    if (blockIdx.x >= *n_tiles) return;
    moe_mma_body<1>(y, h, nullptr, offsets, tiles, table, a);
}
