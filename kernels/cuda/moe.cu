// Mixture-of-experts routing on the GPU. Mirrors `route` in kernels/src/cpu/moe.rs: softmax or
// sigmoid scores, an optional bias used only for selection, group-limited selection (DeepSeek),
// renormalisation and scaling. Ties go to the lower expert index, as on the CPU.

// Scalars of `route`; the layout of `RouteArgs` in cuda/moe.rs.
struct RouteArgs {
    u32 tokens, num_experts, top_k;
    u32 sigmoid;      // 0: softmax scores
    u32 normalize;
    u32 has_bias;
    u32 n_group;      // <= 1: no group limit
    u32 topk_group;
    u32 group_sum_top2;  // 0: a group scores its best expert
    float scaling;
};

// Bounds the host checks before launching (cuda/moe.rs).
#define ROUTE_MAX_K 32
#define ROUTE_MAX_GROUPS 64

// Index of the largest value not yet in `taken[0..n_taken)`, ties to the lower index.
__device__ u32 argmax_excluding(const float* v, u32 len, const u32* taken, u32 n_taken) {
    int best = -1;
    for (u32 i = 0; i < len; i++) {
        bool used = false;
        for (u32 k = 0; k < n_taken; k++) used |= taken[k] == i;
        if (!used && (best < 0 || v[i] > v[best])) best = (int)i;
    }
    return (u32)best;
}

// One thread per token; `scratch` holds 2 * tokens * num_experts floats (scores, choice).
extern "C" __global__ void route(u32* ids, float* weights, float* scratch, const float* logits,
                                 const float* bias, RouteArgs a) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= a.tokens) return;
    const u32 e = a.num_experts;
    const float* row = logits + (u64)t * e;
    float* scores = scratch + (u64)t * e * 2;
    float* choice = scores + e;
    if (a.sigmoid) {
        for (u32 i = 0; i < e; i++) scores[i] = 1.0f / (1.0f + expf(-row[i]));
    } else {
        float mx = NEG_INF;
        for (u32 i = 0; i < e; i++) mx = fmaxf(mx, row[i]);
        float sum = 0.0f;
        for (u32 i = 0; i < e; i++) {
            scores[i] = expf(row[i] - mx);
            sum += scores[i];
        }
        for (u32 i = 0; i < e; i++) scores[i] /= sum;
    }
    for (u32 i = 0; i < e; i++) choice[i] = a.has_bias ? scores[i] + bias[i] : scores[i];

    if (a.n_group > 1) {
        const u32 size = e / a.n_group;
        float gs[ROUTE_MAX_GROUPS];
        for (u32 g = 0; g < a.n_group; g++) {
            const float* c = choice + g * size;
            u32 top[2];
            top[0] = argmax_excluding(c, size, top, 0);
            float s = c[top[0]];
            if (a.group_sum_top2 && size > 1) {
                top[1] = argmax_excluding(c, size, top, 1);
                s += c[top[1]];
            }
            gs[g] = s;
        }
        u32 keep[ROUTE_MAX_GROUPS];
        for (u32 k = 0; k < a.topk_group; k++) keep[k] = argmax_excluding(gs, a.n_group, keep, k);
        for (u32 g = 0; g < a.n_group; g++) {
            bool kept = false;
            for (u32 k = 0; k < a.topk_group; k++) kept |= keep[k] == g;
            if (!kept) {
                for (u32 i = 0; i < size; i++) choice[g * size + i] = NEG_INF;
            }
        }
    }

    u32 chosen[ROUTE_MAX_K];
    float w[ROUTE_MAX_K];
    float sum = 0.0f;
    for (u32 k = 0; k < a.top_k; k++) {
        chosen[k] = argmax_excluding(choice, e, chosen, k);
        w[k] = scores[chosen[k]];
        sum += w[k];
    }
    const float denom = a.normalize ? sum + 1e-20f : 1.0f;
    for (u32 k = 0; k < a.top_k; k++) {
        ids[(u64)t * a.top_k + k] = chosen[k];
        weights[(u64)t * a.top_k + k] = w[k] / denom * a.scaling;
    }
}

// ---- Expert execution, planned on the device -------------------------------------------------
//
// A pair is (token t, choice k), index p = t * top_k + k of the routing. Every pair routed to an
// expert this rank owns gets a slot: expert e's slots are offsets[e] .. offsets[e+1], so the rows an
// expert works on are contiguous in `h` and `y`. A tile is up to MOE_TM consecutive slots of one
// expert; the grouped kernels run one tile per block column, so each weight byte is read once per
// tile. Nothing here is copied to the host: the host launches the grouped kernels with an upper
// bound of the tile count it can compute itself, and the blocks past the real count exit.
//
// Slots within an expert are handed out by shared-memory atomics, so their order varies from run
// to run; nothing depends on it: each output element is one thread's sum in a fixed order over k,
// whatever rows share its tile, and `moe_combine` adds a token's experts in routing order.

// Bounds and tile sizes; cuda/moe_experts.rs holds the same numbers and checks them before
// launching.
#define MOE_TM 8                // slots (tokens) per tile
#define MOE_PLAN_THREADS 1024   // moe_plan is one block of this many threads,
#define MOE_MAX_EXPERTS 1024    // and its scan gives each thread one expert
#define MOE_WARPS 8             // warps per block of the grouped kernels
#define MOE_KC 1024             // activation columns staged per chunk: MOE_TM * MOE_KC * 4 = 32 KiB
#define MOE_GU_FEATURES 2       // intermediate features per warp in moe_gate_up
#define MOE_DOWN_FEATURES 4     // hidden features per warp in moe_down
#define MOE_NO_SLOT 0xffffffffu // slot_of_pair of a pair whose expert lives on another rank

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the block's total in `*total`.
__device__ u32 block_exclusive_scan(u32 v, u32* total) {
    __shared__ u32 warp_sums[32];
    __shared__ u32 sum_all;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    u32 incl = v;
    for (u32 o = 1; o < 32; o <<= 1) {
        const u32 n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();  // an earlier call may still be reading warp_sums and sum_all
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const u32 s = lane < warps ? warp_sums[lane] : 0u;
        u32 si = s;
        for (u32 o = 1; o < 32; o <<= 1) {
            const u32 n = __shfl_up_sync(0xffffffffu, si, o);
            if (lane >= o) si += n;
        }
        warp_sums[lane] = si - s;
        if (lane == 31) sum_all = si;
    }
    __syncthreads();
    *total = sum_all;
    return incl - v + warp_sums[warp];
}

// Scalars of `moe_plan`; the layout of `PlanArgs` in cuda/moe_experts.rs.
struct PlanArgs {
    u32 pairs, top_k, num_experts;
    u32 max_tiles;   // what the host sized `tiles` for and launches the grouped kernels with
    u32 tile_slots;  // slots per tile: MOE_TM (the SIMT kernels) or MMA_TM (moe_mma.cu)
};

// Groups the routed pairs by expert. `table` holds (gate, up, down) device addresses per expert,
// 0 for an expert owned by another rank. Writes, for the `pairs` pairs of `ids` / `weights`:
// slot_of_pair[pairs] (MOE_NO_SLOT if not owned), token_of_slot[slots], weight_of_slot[slots],
// offsets[num_experts + 1], tiles[2 * max_tiles] as (expert, first slot) of up to tile_slots
// slots each, and n_tiles[1].
// One block of MOE_PLAN_THREADS threads; num_experts <= MOE_MAX_EXPERTS.
extern "C" __global__ void __launch_bounds__(MOE_PLAN_THREADS)
    moe_plan(u32* slot_of_pair, u32* token_of_slot, float* weight_of_slot, u32* offsets,
             u32* tiles, u32* n_tiles, const u32* ids, const float* weights, const u64* table,
             PlanArgs a) {
    __shared__ u32 fill[MOE_MAX_EXPERTS];  // tokens per expert, then its next free slot
    __shared__ u32 slot_start[MOE_MAX_EXPERTS];
    __shared__ u32 tile_start[MOE_MAX_EXPERTS];
    const u32 tid = threadIdx.x, ne = a.num_experts;
    for (u32 e = tid; e < ne; e += blockDim.x) fill[e] = 0;
    __syncthreads();
    for (u32 p = tid; p < a.pairs; p += blockDim.x) {
        const u32 e = ids[p];
        if (e < ne && table[3 * (u64)e] != 0) atomicAdd(&fill[e], 1u);
    }
    __syncthreads();
    const u32 count = tid < ne ? fill[tid] : 0u;
    u32 slots_total, tiles_total;
    const u32 s0 = block_exclusive_scan(count, &slots_total);
    const u32 t0 = block_exclusive_scan((count + a.tile_slots - 1) / a.tile_slots, &tiles_total);
    // tiles_total <= pairs / tile_slots + (experts with tokens) <= max_tiles by construction; the
    // clamp only keeps a wrong bound from writing past `tiles`.
    const u32 nt = min(tiles_total, a.max_tiles);
    if (tid < ne) {
        slot_start[tid] = s0;
        tile_start[tid] = t0;
        offsets[tid] = s0;
        fill[tid] = s0;
    }
    if (tid == 0) {
        offsets[ne] = slots_total;
        *n_tiles = nt;
    }
    __syncthreads();
    for (u32 p = tid; p < a.pairs; p += blockDim.x) {
        const u32 e = ids[p];
        u32 slot = MOE_NO_SLOT;
        if (e < ne && table[3 * (u64)e] != 0) {
            slot = atomicAdd(&fill[e], 1u);
            token_of_slot[slot] = p / a.top_k;
            weight_of_slot[slot] = weights[p];
        }
        slot_of_pair[p] = slot;
    }
    for (u32 i = tid; i < nt; i += blockDim.x) {
        // Tile i belongs to the last expert whose first tile is at or before it: an expert with
        // no tiles starts where the next one does, so the last of equal starts is the one with
        // tiles.
        u32 lo = 0, hi = ne - 1;
        while (lo < hi) {
            const u32 mid = (lo + hi + 1) >> 1;
            if (tile_start[mid] <= i) lo = mid;
            else hi = mid - 1;
        }
        tiles[2 * (u64)i] = lo;
        tiles[2 * (u64)i + 1] = slot_start[lo] + (i - tile_start[lo]) * a.tile_slots;
    }
}

// Scalars of `moe_gate_up` and `moe_down`; the layout of `GroupedArgs` in cuda/moe_experts.rs.
struct GroupedArgs {
    u32 n;      // output features (intermediate for gate/up, hidden for down)
    u32 k;      // input features, the length of a weight row
    int dtype;  // of every expert's weights (DT_*)
};

// Where activation column c of a staged chunk lives in shared memory. The float4 holding it is
// swizzled (bit 0 of its index flipped by bit 3) so that the 8 lanes of a quarter-warp, reading a
// float4 each at a 32-byte stride as the 16-bit weight path does, hit 8 distinct bank groups.
__device__ __forceinline__ u32 moe_swz(u32 c) { return c ^ (((c >> 5) & 1u) << 2); }

// 16 bytes of a weight row from element k (16-byte aligned), widened: 4 f32 or 8 f16/bf16.
template <int DT>
__device__ __forceinline__ void moe_load16(const char* row, u32 k, float* out) {
    if constexpr (DT == DT_F32) {
        const float4 v = __ldg((const float4*)(row + (u64)k * 4));
        out[0] = v.x;
        out[1] = v.y;
        out[2] = v.z;
        out[3] = v.w;
    } else {
        const uint4 v = __ldg((const uint4*)(row + (u64)k * 2));
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            // Little-endian: element 2i is the low half.
            if constexpr (DT == DT_BF16) {
                out[2 * i] = __uint_as_float(w[i] << 16);
                out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
            } else {
                out[2 * i] = f16_to_f32((u16)(w[i] & 0xffffu));
                out[2 * i + 1] = f16_to_f32((u16)(w[i] >> 16));
            }
        }
    }
}

// Copies columns [c0, c1) of the tile's `rows` activation rows into `xs` (swizzled), once the
// previous chunk's readers are done. Every thread of the block calls it.
__device__ __forceinline__ void moe_stage(float* xs, const float* const (&src)[MOE_TM], u32 rows,
                                          u32 c0, u32 c1) {
    __syncthreads();
    const u32 len = c1 - c0;
#pragma unroll
    for (int m = 0; m < MOE_TM; m++) {
        if ((u32)m < rows) {
            for (u32 c = threadIdx.x; c < len; c += blockDim.x) {
                xs[m * MOE_KC + moe_swz(c)] = src[m][c0 + c];
            }
        }
    }
    __syncthreads();
}

// acc[r][m] += sum over k in [c0, c1) of w_r[k] * x_m[k], for the warp's R weight rows (`wrow`,
// each the address of the row's element 0) and the tile's staged rows m < rows. Lanes stride k,
// so a warp reads each row in 512-byte coalesced runs (16 bytes a lane) and every weight element
// once per tile. `vec`: rows are 16-byte aligned, so whole 16-byte vectors are loaded (c0 and c1
// are then multiples of the vector width); otherwise one element at a time.
template <int DT, int R>
__device__ __forceinline__ void moe_dot_chunk(float (&acc)[R][MOE_TM], const char* const (&wrow)[R],
                                              const float* xs, u32 c0, u32 c1, u32 rows,
                                              bool vec) {
    const u32 lane = threadIdx.x & 31;
    if (vec) {
        constexpr u32 V = DT == DT_F32 ? 4 : 8;
        for (u32 k = c0 + lane * V; k < c1; k += 32 * V) {
            float w[R][V];
#pragma unroll
            for (int r = 0; r < R; r++) moe_load16<DT>(wrow[r], k, w[r]);
            const u32 kk = k - c0;
#pragma unroll
            for (int m = 0; m < MOE_TM; m++) {
                if ((u32)m < rows) {
                    float xv[V];
#pragma unroll
                    for (u32 q = 0; q < V; q += 4) {
                        const float4 v = *(const float4*)(xs + m * MOE_KC + moe_swz(kk + q));
                        xv[q] = v.x;
                        xv[q + 1] = v.y;
                        xv[q + 2] = v.z;
                        xv[q + 3] = v.w;
                    }
#pragma unroll
                    for (int r = 0; r < R; r++) {
#pragma unroll
                        for (u32 q = 0; q < V; q++) acc[r][m] = fmaf(w[r][q], xv[q], acc[r][m]);
                    }
                }
            }
        }
    } else {
        for (u32 k = c0 + lane; k < c1; k += 32) {
            float w[R];
#pragma unroll
            for (int r = 0; r < R; r++) w[r] = load_elem(wrow[r], DT, k);
#pragma unroll
            for (int m = 0; m < MOE_TM; m++) {
                if ((u32)m < rows) {
                    const float xv = xs[m * MOE_KC + moe_swz(k - c0)];
#pragma unroll
                    for (int r = 0; r < R; r++) acc[r][m] = fmaf(w[r], xv, acc[r][m]);
                }
            }
        }
    }
}

// The tile of this block: its expert, first slot and row count (1..=tm, the plan's tile_slots).
struct MoeTile {
    u32 expert, first, rows;
};

__device__ __forceinline__ MoeTile moe_tile(const u32* tiles, const u32* offsets, u32 tm) {
    MoeTile t;
    t.expert = tiles[2 * (u64)blockIdx.x];
    t.first = tiles[2 * (u64)blockIdx.x + 1];
    t.rows = min(offsets[t.expert + 1] - t.first, tm);
    return t;
}

// Runs the chunks of a tile: stages `src` rows, accumulates the warp's R rows. A warp with no
// output feature in range still stages (the block synchronises) but skips the products.
template <int DT, int R>
__device__ __forceinline__ void moe_tile_product(float (&acc)[R][MOE_TM], float* xs,
                                                 const char* const (&wrow)[R],
                                                 const float* const (&src)[MOE_TM], u32 rows,
                                                 u32 k, bool vec, bool active) {
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int m = 0; m < MOE_TM; m++) acc[r][m] = 0.0f;
    }
    for (u32 c0 = 0; c0 < k; c0 += MOE_KC) {
        const u32 c1 = min(c0 + MOE_KC, k);
        moe_stage(xs, src, rows, c0, c1);
        if (active) moe_dot_chunk<DT, R>(acc, wrow, xs, c0, c1, rows, vec);
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int m = 0; m < MOE_TM; m++) {
            if ((u32)m < rows) acc[r][m] = warp_sum(acc[r][m]);
        }
    }
}

__device__ __forceinline__ bool moe_vec_ok(int dtype, u32 k, const void* a, const void* b) {
    const u32 v = dtype == DT_F32 ? 4u : 8u;
    return k % v == 0 && (((u64)a | (u64)b) & 15u) == 0;
}

// h[slot, n] = silu(x_t · gate_e[n]) * (x_t · up_e[n]) for t = token_of_slot[slot].
template <int DT>
__device__ __forceinline__ void moe_gate_up_body(float* xs, float* h, const float* x,
                                                 const u32* token_of_slot, const u32* offsets,
                                                 const u32* tiles, const u64* table,
                                                 GroupedArgs a) {
    constexpr int F = MOE_GU_FEATURES;
    constexpr u64 esz = DT == DT_F32 ? 4 : 2;
    const MoeTile t = moe_tile(tiles, offsets, MOE_TM);
    const char* gate = (const char*)table[3 * (u64)t.expert];
    const char* up = (const char*)table[3 * (u64)t.expert + 1];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 n0 = (blockIdx.y * MOE_WARPS + warp) * F;
    const char* wrow[2 * F];
#pragma unroll
    for (int j = 0; j < F; j++) {
        // Features past n read the last row and are not written.
        const u64 row = (u64)min(n0 + j, a.n - 1) * a.k * esz;
        wrow[j] = gate + row;
        wrow[F + j] = up + row;
    }
    const float* src[MOE_TM];
#pragma unroll
    for (int m = 0; m < MOE_TM; m++) {
        src[m] = x + (u64)token_of_slot[t.first + min((u32)m, t.rows - 1)] * a.k;
    }
    float acc[2 * F][MOE_TM];
    moe_tile_product<DT, 2 * F>(acc, xs, wrow, src, t.rows, a.k,
                                moe_vec_ok(DT, a.k, gate, up), n0 < a.n);
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < F; j++) {
#pragma unroll
            for (int m = 0; m < MOE_TM; m++) {
                if ((u32)m < t.rows && n0 + j < a.n) {
                    const float g = acc[j][m];
                    h[(u64)(t.first + m) * a.n + n0 + j] = g / (1.0f + expf(-g)) * acc[F + j][m];
                }
            }
        }
    }
}

// y[slot, n] = h[slot, :] · down_e[n, :].
template <int DT>
__device__ __forceinline__ void moe_down_body(float* xs, float* y, const float* h,
                                              const u32* offsets, const u32* tiles,
                                              const u64* table, GroupedArgs a) {
    constexpr int F = MOE_DOWN_FEATURES;
    constexpr u64 esz = DT == DT_F32 ? 4 : 2;
    const MoeTile t = moe_tile(tiles, offsets, MOE_TM);
    const char* down = (const char*)table[3 * (u64)t.expert + 2];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 n0 = (blockIdx.y * MOE_WARPS + warp) * F;
    const char* wrow[F];
#pragma unroll
    for (int j = 0; j < F; j++) wrow[j] = down + (u64)min(n0 + j, a.n - 1) * a.k * esz;
    const float* src[MOE_TM];
#pragma unroll
    for (int m = 0; m < MOE_TM; m++) src[m] = h + (u64)(t.first + min((u32)m, t.rows - 1)) * a.k;
    float acc[F][MOE_TM];
    moe_tile_product<DT, F>(acc, xs, wrow, src, t.rows, a.k, moe_vec_ok(DT, a.k, down, down),
                            n0 < a.n);
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < F; j++) {
#pragma unroll
            for (int m = 0; m < MOE_TM; m++) {
                if ((u32)m < t.rows && n0 + j < a.n) {
                    y[(u64)(t.first + m) * a.n + n0 + j] = acc[j][m];
                }
            }
        }
    }
}

// Grid: (max_tiles, ceil(n / (MOE_WARPS * MOE_GU_FEATURES))), MOE_WARPS * 32 threads. h holds
// slots * n floats; x holds tokens * k.
extern "C" __global__ void __launch_bounds__(MOE_WARPS * 32)
    moe_gate_up(float* h, const float* x, const u32* token_of_slot, const u32* offsets,
                const u32* tiles, const u32* n_tiles, const u64* table, GroupedArgs a) {
    __shared__ __align__(16) float xs[MOE_TM * MOE_KC];
    if (blockIdx.x >= *n_tiles) return;  // the whole block: the bound was an upper one
    if (a.dtype == DT_BF16) {
        moe_gate_up_body<DT_BF16>(xs, h, x, token_of_slot, offsets, tiles, table, a);
    } else if (a.dtype == DT_F16) {
        moe_gate_up_body<DT_F16>(xs, h, x, token_of_slot, offsets, tiles, table, a);
    } else {
        moe_gate_up_body<DT_F32>(xs, h, x, token_of_slot, offsets, tiles, table, a);
    }
}

// Grid: (max_tiles, ceil(n / (MOE_WARPS * MOE_DOWN_FEATURES))), MOE_WARPS * 32 threads. y holds
// slots * n floats; h holds slots * k.
extern "C" __global__ void __launch_bounds__(MOE_WARPS * 32)
    moe_down(float* y, const float* h, const u32* offsets, const u32* tiles, const u32* n_tiles,
             const u64* table, GroupedArgs a) {
    __shared__ __align__(16) float xs[MOE_TM * MOE_KC];
    if (blockIdx.x >= *n_tiles) return;
    if (a.dtype == DT_BF16) {
        moe_down_body<DT_BF16>(xs, y, h, offsets, tiles, table, a);
    } else if (a.dtype == DT_F16) {
        moe_down_body<DT_F16>(xs, y, h, offsets, tiles, table, a);
    } else {
        moe_down_body<DT_F32>(xs, y, h, offsets, tiles, table, a);
    }
}

// out[t, :] = sum over k = 0 .. top_k - 1 of w[t, k] * y[slot_of_pair[t, k], :], in that order,
// skipping pairs whose expert lives on another rank (so the result never depends on slot order,
// and no float atomics are needed). Grid: one block per token.
extern "C" __global__ void moe_combine(float* out, const float* y, const u32* slot_of_pair,
                                       const float* weights, u32 top_k, u32 cols) {
    const u64 pair0 = (u64)blockIdx.x * top_k;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        float s = 0.0f;
        for (u32 k = 0; k < top_k; k++) {
            const u32 slot = slot_of_pair[pair0 + k];
            if (slot != MOE_NO_SLOT) s = fmaf(weights[pair0 + k], y[(u64)slot * cols + c], s);
        }
        out[(u64)blockIdx.x * cols + c] = s;
    }
}

// The routings one moe_count launch counts, passed by value (a graph records kernel arguments,
// so nothing is uploaded); COUNT_ROUTINGS of cuda/moe.rs.
#define COUNT_ROUTINGS 64
struct CountTable {
    u64 ids[COUNT_ROUTINGS];    // address of each routing's [tokens, top_k] expert ids
    u32 pairs[COUNT_ROUTINGS];  // tokens * top_k of each
    u32 top_k[COUNT_ROUTINGS];
};

// Tokens per expert of several routings at once: counts[r * num_experts + e] += the pairs of
// routing r choosing e (< num_experts), leaving out the pairs of rows at or past live[0] (a
// graph step's padding; live is null when every row counts). Grid: (pair blocks, routings); one
// thread per pair. Float atomics on whole numbers below 2^24 are exact whatever the order.
extern "C" __global__ void moe_count(float* counts, CountTable t, const u32* live,
                                     u32 num_experts) {
    const u32 r = blockIdx.y;
    const u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 limit = live ? min((u64)t.pairs[r], (u64)live[0] * t.top_k[r]) : (u64)t.pairs[r];
    if (p < limit) {
        const u32 e = ((const u32*)t.ids[r])[p];
        if (e < num_experts) atomicAdd(&counts[(u64)r * num_experts + e], 1.0f);
    }
}
