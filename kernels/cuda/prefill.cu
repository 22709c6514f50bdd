// Tiled attention for prompt steps, on the tensor cores (FlashAttention-2's scheme over the paged
// cache of attention.cu). The decode kernels there serve one token per block and re-read every
// key for every token; here a block serves up to 64 (token, query head) rows of one sequence and
// one KV head, reads each key and value once for all of them into shared memory, and multiplies
// on the tensor cores (tf32 operands, f32 accumulation): scores Q·Kᵀ, then probabilities · V,
// with the online softmax in between kept per row in registers.
//
// The step's tiles (cuda/step.rs) cut every sequence's new tokens into runs of at most PF_TILE;
// a block takes part of a tile: `group_heads` (1, 2 or 4) query heads of one KV head times
// PF_TILE / group_heads tokens, a warp per 16 tokens of one head. Blocks: (tiles * group_heads,
// num_kv_heads * head_groups). Keys are read PF_KEYS at a time; a warp whose tokens attend none
// of a chunk's keys (causality, sliding window) skips its products but still loads its share.
// Queries and probabilities are rounded to tf32 (10 mantissa bits), so results differ from the
// f32 decode kernels by a few 1e-4 of the output's scale; keys and values are bf16 in the cache, which tf32
// holds exactly.

#define PF_WARPS 4
#define PF_THREADS (PF_WARPS * 32)
// Tokens per tile of the step's tile list (cuda/plan.rs PREFILL_TILE_TOKENS).
#define PF_TILE 64
// Keys per chunk: four n8 tiles of the score product.
#define PF_KEYS 32
// Probabilities staged per warp for the second product: 16 rows of PF_KEYS, padded by 4 so that
// a fragment's 32 loads hit 32 banks.
#define PF_PSTRIDE (PF_KEYS + 4)

// The rows a warp serves: tokens [first, first + rows) of head `head`; rows = 0 for a warp left
// without any (its block's last tokens or heads).
struct PfWarp {
    u32 first, rows, head;
    u32 lo, hi;  // the keys its rows attend: [attn_first(first row), attn_end(last row))
};

// Rows of a thread in the mma layout: g = lane / 4 and g + 8.
struct PfRows {
    bool ok[2];
    u32 pos[2], from[2];
};

// Keys [kb, kb + PF_KEYS) of KV head `kvh`, and their values, copied into shared memory as the
// cache's bf16 rows, padded by 8 elements (keys of different rows of an mma fragment then sit in
// different banks); rows at or past `hi` are zeros, so their probabilities (0) never meet stale
// values.
__device__ __forceinline__ void pf_load(u16* ks, u16* vs, const u16* kc, const u16* vc,
                                        const u32* table, u32 kvh, u32 kb, u32 hi,
                                        const AttnArgs& a) {
    const u32 k8 = a.qk_dim / 8, v8 = a.v_dim / 8;
    for (u32 i = threadIdx.x; i < PF_KEYS * (k8 + v8); i += PF_THREADS) {
        const bool key = i < PF_KEYS * k8;
        const u32 per = key ? k8 : v8, e = key ? i : i - PF_KEYS * k8;
        const u32 r = e / per, c = e % per, j = kb + r;
        uint4 val = {0u, 0u, 0u, 0u};
        if (j < hi) {
            const u64 row =
                ((u64)table[j / a.block_size] * a.num_kv_heads + kvh) * a.block_size +
                j % a.block_size;
            // 16-byte aligned: qk_dim, v_dim and v_stride are multiples of 8 (cuda/plan.rs).
            val = key ? ((const uint4*)(kc + row * a.qk_dim))[c]
                      : ((const uint4*)(vc + row * a.v_stride))[c];
        }
        u16* dst = key ? ks + r * (a.qk_dim + 8) : vs + r * (a.v_dim + 8);
        *(uint4*)(dst + c * 8) = val;
    }
}

// A bf16 bit pattern as the tf32 operand it exactly is.
__device__ __forceinline__ u32 pf_bf16(u16 b) { return ((u32)b) << 16; }

template <int QK_STEPS, int V_TILES>
__device__ void prefill_attention_body(float* out, float* lse, const float* q, const u16* kc,
                                       const u16* vc, const u32* tok_pos, const u32* tok_table,
                                       const u32* tables, const u32* tiles, const AttnArgs& a) {
    __shared__ __align__(16) u16 ks[PF_KEYS * (QK_STEPS * 8 + 8)];
    __shared__ __align__(16) u16 vs[PF_KEYS * (V_TILES * 8 + 8)];
    __shared__ float ps[PF_WARPS * 16 * PF_PSTRIDE];
    const u32 hb = a.group_heads, span = PF_TILE / hb;
    const u32 tile = blockIdx.x / hb, sub = blockIdx.x % hb;
    const u32 tile_first = tiles[2 * tile], tile_n = tiles[2 * tile + 1];
    if (sub * span >= tile_n) return;  // the whole block: its tile is shorter
    const u32 t_begin = tile_first + sub * span;
    const u32 t_end = tile_first + min(tile_n, (sub + 1) * span);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const u32 group = a.num_heads / a.num_kv_heads;
    const u32 kvh = blockIdx.y / a.head_groups;
    const u32 slot = (blockIdx.y % a.head_groups) * hb + warp % hb;

    PfWarp w;
    w.first = t_begin + (warp / hb) * 16;
    w.rows = slot < group && w.first < t_end ? min(16u, t_end - w.first) : 0;
    w.head = kvh * group + slot;
    w.lo = w.rows ? attn_first(tok_pos[w.first], a) : 0;
    w.hi = w.rows ? attn_end(tok_pos[w.first + w.rows - 1], a) : 0;
    PfRows rw;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const u32 row = g + 8 * r;
        rw.ok[r] = row < w.rows;
        rw.pos[r] = rw.ok[r] ? tok_pos[w.first + row] : 0;
        rw.from[r] = attn_first(rw.pos[r], a);
    }

    // The warp's queries as A fragments, rounded to tf32: rows g, g + 8, dims t4 and t4 + 4 of
    // each 8-wide step.
    const u32 nk = a.qk_dim / 8, nv = a.v_dim / 8;
    u32 qa[QK_STEPS][4];
#pragma unroll
    for (int s = 0; s < QK_STEPS; s++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 row = g + 8 * (i & 1), d = 8 * s + t4 + 4 * (i >> 1);
            qa[s][i] = s < (int)nk && row < w.rows
                           ? to_tf32(q[((u64)(w.first + row) * a.num_heads + w.head) * a.qk_dim +
                                       d])
                           : 0u;
        }
    }

    float o[V_TILES][4];
#pragma unroll
    for (int n = 0; n < V_TILES; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) o[n][e] = 0.0f;
    }
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    float* pw = ps + warp * 16 * PF_PSTRIDE;
    const u32* table = tables + tok_table[t_begin];
    const u32 lo = attn_first(tok_pos[t_begin], a), hi = attn_end(tok_pos[t_end - 1], a);
    const u32 kst = a.qk_dim + 8, vst = a.v_dim + 8;

    for (u32 kb = lo; kb < hi; kb += PF_KEYS) {
        pf_load(ks, vs, kc, vc, table, kvh, kb, hi, a);
        __syncthreads();
        if (w.rows != 0 && kb < w.hi && kb + PF_KEYS > w.lo) {
            // Scores of the warp's 16 rows against the chunk's 32 keys: B[k][n] = K[n][k].
            float s[4][4];
#pragma unroll
            for (int n = 0; n < 4; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = 0.0f;
            }
#pragma unroll
            for (int st = 0; st < QK_STEPS; st++) {
                if (st < (int)nk) {
#pragma unroll
                    for (int n = 0; n < 4; n++) {
                        const u16* kr = ks + (n * 8 + g) * kst + st * 8 + t4;
                        const u32 b[2] = {pf_bf16(kr[0]), pf_bf16(kr[4])};
                        mma_tf32(s[n], qa[st], b);
                    }
                }
            }
            // Mask and scale; each row's chunk maximum over the four lanes that hold it.
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int n = 0; n < 4; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e >> 1;
                    const u32 j = kb + n * 8 + 2 * t4 + (e & 1);
                    const bool ok = rw.ok[r] && j >= rw.from[r] && j <= rw.pos[r] && j < a.key_hi;
                    s[n][e] = ok ? s[n][e] * a.scale : NEG_INF;
                    mx[r] = fmaxf(mx[r], s[n][e]);
                }
            }
            float ref[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float m_new = fmaxf(m[r], mx[r]);
                // A row with no key yet keeps -inf; 0 as its reference keeps exp() from NaN.
                ref[r] = m_new == NEG_INF ? 0.0f : m_new;
                const float c = expf(m[r] - ref[r]);
                m[r] = m_new;
                l[r] *= c;
#pragma unroll
                for (int n = 0; n < V_TILES; n++) {
                    o[n][2 * r] *= c;
                    o[n][2 * r + 1] *= c;
                }
            }
            // Probabilities, staged in shared memory in the A layout's rows for P·V.
#pragma unroll
            for (int n = 0; n < 4; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e >> 1;
                    const float p = expf(s[n][e] - ref[r]);
                    l[r] += p;
                    pw[(g + 8 * r) * PF_PSTRIDE + n * 8 + 2 * t4 + (e & 1)] =
                        __uint_as_float(to_tf32(p));
                }
            }
            __syncwarp();
            // o += P[16 x 32] · V[32 x v_dim], eight keys at a time: B[k][n] = V[k][n].
#pragma unroll
            for (int kk = 0; kk < PF_KEYS / 8; kk++) {
                u32 pa[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    pa[i] = __float_as_uint(
                        pw[(g + 8 * (i & 1)) * PF_PSTRIDE + kk * 8 + t4 + 4 * (i >> 1)]);
                }
                const u16* vr = vs + (kk * 8 + t4) * vst + g;
#pragma unroll
                for (int n = 0; n < V_TILES; n++) {
                    if (n < (int)nv) {
                        const u32 b[2] = {pf_bf16(vr[n * 8]), pf_bf16(vr[4 * vst + n * 8])};
                        mma_tf32(o[n], pa, b);
                    }
                }
            }
            __syncwarp();  // pw is read before the next chunk rewrites it
        }
        __syncthreads();  // ks and vs are read before the next chunk's load
    }

    // Each row's sum over its four lanes, then the normalised outputs.
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (!rw.ok[r]) continue;
        const u32 row = g + 8 * r;
        const u64 orow_at = (u64)(w.first + row) * a.num_heads + w.head;
        float* orow = out + orow_at * a.v_dim;
        // 0 only for a row with no key in the range (a chunk past its position): zeros.
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        if (lse != nullptr && t4 == 0) lse[orow_at] = attn_lse(m[r], l[r]);
#pragma unroll
        for (int n = 0; n < V_TILES; n++) {
            if (n < (int)nv) {
                orow[n * 8 + 2 * t4] = o[n][2 * r] * inv;
                orow[n * 8 + 2 * t4 + 1] = o[n][2 * r + 1] * inv;
            }
        }
    }
}

// Keys up to 128 wide (Llama, Qwen3, Mixtral), values up to 128.
extern "C" __global__ void __launch_bounds__(PF_THREADS)
    prefill_attention(float* out, float* lse, const float* q, const u16* kc, const u16* vc,
                      const u32* tok_pos, const u32* tok_table, const u32* tables,
                      const u32* tiles, AttnArgs a) {
    prefill_attention_body<16, 16>(out, lse, q, kc, vc, tok_pos, tok_table, tables, tiles, a);
}

// Keys up to 192 wide (MLA's expanded form: 128 + 64 rotary), values up to 128.
extern "C" __global__ void __launch_bounds__(PF_THREADS)
    prefill_attention_wide(float* out, float* lse, const float* q, const u16* kc, const u16* vc,
                           const u32* tok_pos, const u32* tok_table, const u32* tables,
                           const u32* tiles, AttnArgs a) {
    prefill_attention_body<24, 16>(out, lse, q, kc, vc, tok_pos, tok_table, tables, tiles, a);
}
