// Paged KV cache and attention. Cache layout as on the CPU (kernels/src/cpu/attention.rs):
// `[block][kv_head][slot][dim]`, here in bf16 to halve the cache's memory and bandwidth.

// Stores the step's keys and values. slots[t] = block * block_size + slot of token t.
// Grid: one block per token.
extern "C" __global__ void write_kv(u16* kc, u16* vc, const float* k, const float* v,
                                    const u32* slots, u32 kv_heads, u32 kd, u32 vd,
                                    u32 block_size) {
    const u32 t = blockIdx.x;
    const u32 block = slots[t] / block_size, slot = slots[t] % block_size;
    for (u32 i = threadIdx.x; i < kv_heads * kd; i += blockDim.x) {
        const u32 h = i / kd, d = i % kd;
        kc[(((u64)block * kv_heads + h) * block_size + slot) * kd + d] =
            f32_to_bf16(k[(u64)t * kv_heads * kd + i]);
    }
    for (u32 i = threadIdx.x; i < kv_heads * vd; i += blockDim.x) {
        const u32 h = i / vd, d = i % vd;
        vc[(((u64)block * kv_heads + h) * block_size + slot) * vd + d] =
            f32_to_bf16(v[(u64)t * kv_heads * vd + i]);
    }
}

// Scalars of `paged_attention`; the layout of `AttnArgs` in cuda/attention.rs.
struct AttnArgs {
    u32 num_heads, num_kv_heads, qk_dim, v_dim, block_size;
    u32 window;  // 0: no sliding window
    float scale;
};

// Most output dims one thread accumulates (v_dim <= ATTN_THREADS * ATTN_MAX_V_PER_THREAD).
#define ATTN_MAX_V_PER_THREAD 8

// One query row's attention over a run of positions, before normalisation: the running maximum
// score `m`, the sum `l` of exp(score - m), and, for this thread's output dims d = threadIdx.x +
// i * blockDim.x, the exp-weighted sum of values.
struct AttnRun {
    float m, l;
    float acc[ATTN_MAX_V_PER_THREAD];
};

// Attends positions [from, end) of the sequence whose block table is `table`, for the query in
// shared memory `qs` (qk_dim floats); `ps` is blockDim floats of shared scratch. Positions are
// taken blockDim at a time: each thread scores one, then an online softmax (running max and sum)
// rescales the accumulators, so any length fits in fixed shared memory. Scores and accumulation
// are f32; keys and values are widened from bf16. Every thread of the block must call it with
// the same range (it synchronises). An empty range gives m = -inf, l = 0 and zero accumulators.
__device__ AttnRun attend_run(const float* qs, float* ps, const u16* kc, const u16* vc,
                              const u32* table, u32 kvh, u32 from, u32 end, const AttnArgs& a) {
    AttnRun r;
    r.m = NEG_INF;
    r.l = 0.0f;
    for (int i = 0; i < ATTN_MAX_V_PER_THREAD; i++) r.acc[i] = 0.0f;
    for (u32 base = from; base < end; base += blockDim.x) {
        const u32 j = base + threadIdx.x;
        float s = NEG_INF;
        if (j < end) {
            const u64 blk = table[j / a.block_size];
            const u16* krow =
                kc + ((blk * a.num_kv_heads + kvh) * a.block_size + j % a.block_size) * a.qk_dim;
            float dot = 0.0f;
            for (u32 d = 0; d < a.qk_dim; d++) dot += qs[d] * bf16_to_f32(krow[d]);
            s = dot * a.scale;
        }
        const float m_new = fmaxf(r.m, block_max(s));
        const float p = j < end ? expf(s - m_new) : 0.0f;
        const float corr = expf(r.m - m_new);  // 0 on the first chunk (m = -inf)
        ps[threadIdx.x] = p;
        r.l = r.l * corr + block_sum(p);  // block_sum's barriers also publish `ps`
        const u32 n = end - base < blockDim.x ? end - base : blockDim.x;
        for (int i = 0; i < ATTN_MAX_V_PER_THREAD; i++) {
            const u32 d = threadIdx.x + i * blockDim.x;
            if (d >= a.v_dim) break;
            float sum = r.acc[i] * corr;
            for (u32 jj = 0; jj < n; jj++) {
                const u32 jp = base + jj;
                const u64 blk = table[jp / a.block_size];
                sum += ps[jj] * bf16_to_f32(
                    vc[((blk * a.num_kv_heads + kvh) * a.block_size + jp % a.block_size) * a.v_dim + d]);
            }
            r.acc[i] = sum;
        }
        r.m = m_new;
        __syncthreads();  // `ps` is rewritten by the next chunk
    }
    return r;
}

// The first position token t attends (its sliding window's start, or 0).
__device__ __forceinline__ u32 attn_first(u32 pos, const AttnArgs& a) {
    return (a.window != 0 && pos + 1 > a.window) ? pos + 1 - a.window : 0;
}

// Loads query head h of token t into shared memory; returns its KV head.
__device__ __forceinline__ u32 attn_load_query(float* qs, const float* q, u32 t, u32 h,
                                               const AttnArgs& a) {
    const float* qrow = q + ((u64)t * a.num_heads + h) * a.qk_dim;
    for (u32 d = threadIdx.x; d < a.qk_dim; d += blockDim.x) qs[d] = qrow[d];
    __syncthreads();
    return h / (a.num_heads / a.num_kv_heads);
}

// Causal attention of one query head of one token over its sequence's cache, prefill or decode.
// Grid: (tokens, num_heads); block: blockDim threads (a multiple of 32); dynamic shared memory:
// (qk_dim + blockDim) floats.
extern "C" __global__ void paged_attention(float* out, const float* q, const u16* kc,
                                           const u16* vc, const u32* tok_pos,
                                           const u32* tok_table, const u32* tables, AttnArgs a) {
    extern __shared__ float smem[];
    const u32 t = blockIdx.x, h = blockIdx.y;
    const u32 kvh = attn_load_query(smem, q, t, h, a);
    const u32 pos = tok_pos[t];
    const AttnRun r = attend_run(smem, smem + a.qk_dim, kc, vc, tables + tok_table[t], kvh,
                                 attn_first(pos, a), pos + 1, a);
    float* orow = out + ((u64)t * a.num_heads + h) * a.v_dim;
    for (int i = 0; i < ATTN_MAX_V_PER_THREAD; i++) {
        const u32 d = threadIdx.x + i * blockDim.x;
        if (d >= a.v_dim) break;
        orow[d] = r.acc[i] / r.l;
    }
}

// Split-K ("flash decoding") for steps with too few (token, head) rows to fill the GPU: each
// token's attended positions are cut into gridDim.z equal runs, one block per run, and
// `attention_combine` merges them. Grid: (tokens, num_heads, splits); block and shared memory as
// `paged_attention`. Writes, for row r = t * num_heads + h and split s: part_acc[(r * splits + s)
// * v_dim + d] (unnormalised) and part_ml[(r * splits + s) * 2 + {0, 1}] = (m, l).
extern "C" __global__ void paged_attention_split(float* part_acc, float* part_ml, const float* q,
                                                 const u16* kc, const u16* vc,
                                                 const u32* tok_pos, const u32* tok_table,
                                                 const u32* tables, AttnArgs a) {
    extern __shared__ float smem[];
    const u32 t = blockIdx.x, h = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    const u32 kvh = attn_load_query(smem, q, t, h, a);
    const u32 pos = tok_pos[t];
    const u32 lo = attn_first(pos, a);
    const u32 per = (pos + 1 - lo + splits - 1) / splits;
    const u32 from = min(lo + s * per, pos + 1);
    const u32 end = min(from + per, pos + 1);
    const AttnRun r = attend_run(smem, smem + a.qk_dim, kc, vc, tables + tok_table[t], kvh, from,
                                 end, a);
    const u64 part = ((u64)t * a.num_heads + h) * splits + s;
    for (int i = 0; i < ATTN_MAX_V_PER_THREAD; i++) {
        const u32 d = threadIdx.x + i * blockDim.x;
        if (d >= a.v_dim) break;
        part_acc[part * a.v_dim + d] = r.acc[i];
    }
    if (threadIdx.x == 0) {
        part_ml[part * 2] = r.m;
        part_ml[part * 2 + 1] = r.l;
    }
}

// Merges the splits of `paged_attention_split`: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M)
// l_s with M the largest m_s (split 0 is never empty, so M is finite and empty splits weigh 0).
// Grid: one block per (token, head) row; `rows` = tokens * num_heads.
extern "C" __global__ void attention_combine(float* out, const float* part_acc,
                                             const float* part_ml, u32 splits, u32 v_dim) {
    const u64 row = blockIdx.x;
    const float* ml = part_ml + row * splits * 2;
    float mx = NEG_INF;
    for (u32 s = 0; s < splits; s++) mx = fmaxf(mx, ml[2 * s]);
    float l = 0.0f;
    for (u32 s = 0; s < splits; s++) l += ml[2 * s + 1] * expf(ml[2 * s] - mx);
    for (u32 d = threadIdx.x; d < v_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (u32 s = 0; s < splits; s++) {
            acc += part_acc[(row * splits + s) * v_dim + d] * expf(ml[2 * s] - mx);
        }
        out[row * v_dim + d] = acc / l;
    }
}
