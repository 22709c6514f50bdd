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

// Causal attention of one query head of one token over its sequence's cache, prefill or decode.
// Grid: (tokens, num_heads); block: blockDim threads; dynamic shared memory:
// (qk_dim + blockDim) floats. Positions are taken blockDim at a time: each thread scores one, then
// an online softmax (running max and sum) rescales the accumulators, so any context length fits
// in fixed shared memory. Scores and accumulation are f32; keys and values are widened from bf16.
extern "C" __global__ void paged_attention(float* out, const float* q, const u16* kc,
                                           const u16* vc, const u32* tok_pos,
                                           const u32* tok_table, const u32* tables, AttnArgs a) {
    extern __shared__ float smem[];
    float* qs = smem;
    float* ps = smem + a.qk_dim;
    const u32 t = blockIdx.x, h = blockIdx.y;
    const u32 kvh = h / (a.num_heads / a.num_kv_heads);
    const float* qrow = q + ((u64)t * a.num_heads + h) * a.qk_dim;
    for (u32 d = threadIdx.x; d < a.qk_dim; d += blockDim.x) qs[d] = qrow[d];
    __syncthreads();

    const u32 pos = tok_pos[t];
    const u32 lo = (a.window != 0 && pos + 1 > a.window) ? pos + 1 - a.window : 0;
    const u32* table = tables + tok_table[t];
    float m = NEG_INF, l = 0.0f;
    float acc[ATTN_MAX_V_PER_THREAD];
    for (int i = 0; i < ATTN_MAX_V_PER_THREAD; i++) acc[i] = 0.0f;

    for (u32 base = lo; base <= pos; base += blockDim.x) {
        const u32 j = base + threadIdx.x;
        float s = NEG_INF;
        if (j <= pos) {
            const u64 blk = table[j / a.block_size];
            const u16* krow =
                kc + ((blk * a.num_kv_heads + kvh) * a.block_size + j % a.block_size) * a.qk_dim;
            float dot = 0.0f;
            for (u32 d = 0; d < a.qk_dim; d++) dot += qs[d] * bf16_to_f32(krow[d]);
            s = dot * a.scale;
        }
        const float m_new = fmaxf(m, block_max(s));
        const float p = j <= pos ? expf(s - m_new) : 0.0f;
        const float corr = expf(m - m_new);  // 0 on the first chunk (m = -inf)
        ps[threadIdx.x] = p;
        l = l * corr + block_sum(p);  // block_sum's barriers also publish `ps`
        const u32 n = pos + 1 - base < blockDim.x ? pos + 1 - base : blockDim.x;
        for (int i = 0; i < ATTN_MAX_V_PER_THREAD; i++) {
            const u32 d = threadIdx.x + i * blockDim.x;
            if (d >= a.v_dim) break;
            float sum = acc[i] * corr;
            for (u32 jj = 0; jj < n; jj++) {
                const u32 jp = base + jj;
                const u64 blk = table[jp / a.block_size];
                sum += ps[jj] * bf16_to_f32(
                    vc[((blk * a.num_kv_heads + kvh) * a.block_size + jp % a.block_size) * a.v_dim + d]);
            }
            acc[i] = sum;
        }
        m = m_new;
        __syncthreads();  // `ps` is rewritten by the next chunk
    }
    float* orow = out + ((u64)t * a.num_heads + h) * a.v_dim;
    for (int i = 0; i < ATTN_MAX_V_PER_THREAD; i++) {
        const u32 d = threadIdx.x + i * blockDim.x;
        if (d >= a.v_dim) break;
        orow[d] = acc[i] / l;
    }
}
