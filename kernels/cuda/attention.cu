// Paged KV cache and attention. Cache layout as on the CPU (kernels/src/cpu/attention.rs):
// `[block][kv_head][slot][dim]`, here in bf16 to halve the cache's memory and bandwidth.

// Stores the step's keys and values. slots[t] = block * block_size + slot of token t.
// vd = 0 for a cache without value storage (values are a prefix of the keys; vc unused).
// Grid: one block per token.
// The slot of a padding row (NO_SLOT of cuda/step.rs).
#define NO_SLOT 0xffffffffu

extern "C" __global__ void write_kv(u16* kc, u16* vc, const float* k, const float* v,
                                    const u32* slots, u32 kv_heads, u32 kd, u32 vd,
                                    u32 block_size) {
    const u32 t = blockIdx.x;
    if (slots[t] == NO_SLOT) return;  // a padding row of a graph's step
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

// Reads cached key rows out, widened to f32: out[r, h * kd + d] = key of KV head h at slots[r]
// (block * block_size + slot). Grid: one block per row (a step's context rows, in order).
extern "C" __global__ void gather_kv_rows(float* out, const u16* kc, const u32* slots,
                                          u32 kv_heads, u32 kd, u32 block_size) {
    const u32 r = blockIdx.x;
    const u32 block = slots[r] / block_size, slot = slots[r] % block_size;
    for (u32 i = threadIdx.x; i < kv_heads * kd; i += blockDim.x) {
        const u32 h = i / kd, d = i % kd;
        out[(u64)r * kv_heads * kd + i] =
            bf16_to_f32(kc[(((u64)block * kv_heads + h) * block_size + slot) * kd + d]);
    }
}

// Scalars of the attention kernels; the layout of `AttnArgs` in cuda/attention.rs.
struct AttnArgs {
    u32 num_heads, num_kv_heads, qk_dim, v_dim, block_size;
    u32 v_stride;        // elements from one value row to the next: v_dim, or qk_dim when the
                         // values are the first v_dim elements of the key rows (vc == kc)
    u32 window;          // 0: no sliding window
    u32 key_lo, key_hi;  // only positions [key_lo, key_hi) are attended (one chunk of a context
                         // given as rows, cuda/context.rs); 0 and ~0 otherwise
    u32 head_groups;     // blocks per (token, KV head): its query heads are cut into this many
    u32 group_heads;     // query heads per block (the last block of a KV head may have fewer)
    float scale;
};

// Threads per attention block; also the positions one chunk of the online softmax covers.
#define ATTN_THREADS 128
// The kernels are instantiated for two shapes (cuda/plan.rs `AttnKernel`): HEADS query heads
// per block with DIMS output dims per thread (v_dim <= DIMS * ATTN_THREADS), 16 x 2 and, for
// value heads up to 512 (MLA's latent), 8 x 4; both keep 32 accumulators per thread.

// Shared memory of one block, carved from the dynamic allocation (sizes in cuda/plan.rs):
// per chunk position its V row offset, then the block's queries, the chunk's scores (turned
// into probabilities), and per head the running max, running sum and this chunk's rescale.
struct AttnShared {
    u64* vrow;  // ATTN_THREADS
    float* qs;  // group_heads x qk_dim
    float* ss;  // group_heads x ATTN_THREADS
    float *ms, *ls, *cs;  // group_heads each
};

__device__ __forceinline__ AttnShared attn_shared(float* smem, const AttnArgs& a) {
    AttnShared sh;
    sh.vrow = (u64*)smem;
    sh.qs = smem + 2 * ATTN_THREADS;
    sh.ss = sh.qs + a.group_heads * a.qk_dim;
    sh.ms = sh.ss + a.group_heads * ATTN_THREADS;
    sh.ls = sh.ms + a.group_heads;
    sh.cs = sh.ls + a.group_heads;
    return sh;
}

// The block's place: token t, its KV head, and the query heads [h0, h0 + gn) that share it
// (grouped-query attention: the block reads each key and value once for all of them).
struct AttnBlock {
    u32 t, kvh, h0, gn;
};

__device__ __forceinline__ AttnBlock attn_block(const AttnArgs& a) {
    AttnBlock b;
    b.t = blockIdx.x;
    b.kvh = blockIdx.y / a.head_groups;
    const u32 group = a.num_heads / a.num_kv_heads;
    const u32 first = (blockIdx.y % a.head_groups) * a.group_heads;
    b.h0 = b.kvh * group + first;
    b.gn = min(a.group_heads, group - first);
    return b;
}

// The first position token t attends (its sliding window's start, or 0, or the key range's).
__device__ __forceinline__ u32 attn_first(u32 pos, const AttnArgs& a) {
    return max((a.window != 0 && pos + 1 > a.window) ? pos + 1 - a.window : 0u, a.key_lo);
}

// One past the last position token t attends: its own, or the key range's end; never before
// attn_first, so that [attn_first, attn_end) is the (possibly empty) range it attends.
__device__ __forceinline__ u32 attn_end(u32 pos, const AttnArgs& a) {
    return max(min(pos + 1, a.key_hi), attn_first(pos, a));
}

// A row's log-sum-exp from its running max and sum (-inf for a row that attended no key).
__device__ __forceinline__ float attn_lse(float m, float l) {
    return l > 0.0f ? m + logf(l) : NEG_INF;
}

// Attention of the block's query heads over positions [from, end) of the sequence whose block
// table is `table`, before normalisation: afterwards sh.ms / sh.ls hold each head's running max
// score and sum of exp(score - max), and acc[g][i] the exp-weighted sum of values for head g and
// output dim DIMS * threadIdx.x + i. Positions are taken ATTN_THREADS at a time: each thread scores
// one position against every head (one read of its key row), a warp per head turns the chunk's
// scores into probabilities with an online softmax, then each thread accumulates its output dims
// of every head (one read of each value). f32 throughout; keys and values widened from bf16.
// Every thread of the block calls it with the same range; an empty range leaves max -inf, sum 0
// and zero accumulators.
template <int HEADS, int DIMS>
__device__ void attend_run(float (&acc)[HEADS][DIMS], const AttnShared& sh,
                           const AttnBlock& blk, const u16* kc, const u16* vc, const u32* table,
                           u32 from, u32 end, const AttnArgs& a) {
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (u32 g = tid; g < blk.gn; g += blockDim.x) {
        sh.ms[g] = NEG_INF;
        sh.ls[g] = 0.0f;
    }
#pragma unroll
    for (int g = 0; g < HEADS; g++) {
#pragma unroll
        for (int i = 0; i < DIMS; i++) acc[g][i] = 0.0f;
    }
    __syncthreads();
    for (u32 base = from; base < end; base += ATTN_THREADS) {
        const u32 n = min(end - base, (u32)ATTN_THREADS);
        if (tid < n) {
            const u32 j = base + tid;
            const u64 row =
                ((u64)table[j / a.block_size] * a.num_kv_heads + blk.kvh) * a.block_size +
                j % a.block_size;
            sh.vrow[tid] = row * a.v_stride;
            const u16* krow = kc + row * a.qk_dim;
            float dot[HEADS];
#pragma unroll
            for (int g = 0; g < HEADS; g++) dot[g] = 0.0f;
            if ((a.qk_dim & 7) == 0) {
                // 16-byte loads (8 keys' elements at a time): each thread walks its own row, so
                // scalar loads would touch every 32-byte sector of it 16 times.
                const uint4* k8 = (const uint4*)krow;  // 16-byte aligned: qk_dim % 8 == 0
                for (u32 d8 = 0; d8 < a.qk_dim / 8; d8++) {
                    const uint4 u = k8[d8];
                    const u32 words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        const u32 w = words[e >> 1];
                        const float k = bf16_to_f32((u16)((e & 1) ? (w >> 16) : (w & 0xffffu)));
                        const u32 d = d8 * 8 + e;
#pragma unroll
                        for (int g = 0; g < HEADS; g++) {
                            if (g < blk.gn) dot[g] += sh.qs[g * a.qk_dim + d] * k;
                        }
                    }
                }
            } else {
                for (u32 d = 0; d < a.qk_dim; d++) {
                    const float k = bf16_to_f32(krow[d]);
#pragma unroll
                    for (int g = 0; g < HEADS; g++) {
                        if (g < blk.gn) dot[g] += sh.qs[g * a.qk_dim + d] * k;
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < HEADS; g++) {
                if (g < blk.gn) sh.ss[g * ATTN_THREADS + tid] = dot[g] * a.scale;
            }
        } else {
            for (u32 g = 0; g < blk.gn; g++) sh.ss[g * ATTN_THREADS + tid] = NEG_INF;
        }
        __syncthreads();
        for (u32 g = warp; g < blk.gn; g += blockDim.x / 32) {
            float* s = sh.ss + g * ATTN_THREADS;
            float mx = NEG_INF;
            for (u32 i = lane; i < ATTN_THREADS; i += 32) mx = fmaxf(mx, s[i]);
            const float m_old = sh.ms[g];
            const float m_new = fmaxf(m_old, warp_max(mx));  // finite: position `base` is scored
            float sum = 0.0f;
            for (u32 i = lane; i < ATTN_THREADS; i += 32) {
                const float p = expf(s[i] - m_new);  // 0 for the unscored tail
                s[i] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            __syncwarp();  // every lane has read ms[g] before lane 0 replaces it
            if (lane == 0) {
                const float c = expf(m_old - m_new);  // 0 on the first chunk
                sh.cs[g] = c;
                sh.ls[g] = sh.ls[g] * c + sum;
                sh.ms[g] = m_new;
            }
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < HEADS; g++) {
            if (g < blk.gn) {
#pragma unroll
                for (int i = 0; i < DIMS; i++) acc[g][i] *= sh.cs[g];
            }
        }
        const u32 d0 = DIMS * tid;
        if (d0 < a.v_dim) {
            for (u32 jj = 0; jj < n; jj++) {
                const u16* vr = vc + sh.vrow[jj];
                float v[DIMS];
#pragma unroll
                for (int i = 0; i < DIMS; i++) {
                    v[i] = d0 + i < a.v_dim ? bf16_to_f32(vr[d0 + i]) : 0.0f;
                }
#pragma unroll
                for (int g = 0; g < HEADS; g++) {
                    if (g < blk.gn) {
                        const float p = sh.ss[g * ATTN_THREADS + jj];
#pragma unroll
                        for (int i = 0; i < DIMS; i++) acc[g][i] += p * v[i];
                    }
                }
            }
        }
        __syncthreads();  // `ss`, `cs` and `vrow` are rewritten by the next chunk
    }
}

// Loads the block's query heads of its token into shared memory (they are adjacent in q's row).
__device__ __forceinline__ void attn_load_queries(const AttnShared& sh, const float* q,
                                                  const AttnBlock& blk, const AttnArgs& a) {
    const float* src = q + ((u64)blk.t * a.num_heads + blk.h0) * a.qk_dim;
    for (u32 i = threadIdx.x; i < blk.gn * a.qk_dim; i += blockDim.x) sh.qs[i] = src[i];
    // attend_run synchronises before the queries are read.
}

// Causal attention of one token's query heads that share a KV head, over its sequence's cache,
// prefill or decode. Grid: (tokens, num_kv_heads * head_groups); block: ATTN_THREADS threads;
// dynamic shared memory as `AttnShared`. `lse`, unless null, receives each (token, head) row's
// log-sum-exp of its scores.
template <int HEADS, int DIMS>
__device__ void paged_attention_body(float* out, float* lse, const float* q, const u16* kc,
                                     const u16* vc, const u32* tok_pos, const u32* tok_table,
                                     const u32* tables, const AttnArgs& a) {
    extern __shared__ float smem[];
    const AttnShared sh = attn_shared(smem, a);
    const AttnBlock blk = attn_block(a);
    attn_load_queries(sh, q, blk, a);
    const u32 pos = tok_pos[blk.t];
    float acc[HEADS][DIMS];
    attend_run<HEADS, DIMS>(acc, sh, blk, kc, vc, tables + tok_table[blk.t], attn_first(pos, a),
                            attn_end(pos, a), a);
#pragma unroll
    for (int g = 0; g < HEADS; g++) {
        if (g >= blk.gn) break;
        const u64 row = (u64)blk.t * a.num_heads + blk.h0 + g;
        float* orow = out + row * a.v_dim;
        // A row with no key in the range (a chunk past its position) is zeros.
        const float inv = sh.ls[g] > 0.0f ? 1.0f / sh.ls[g] : 0.0f;
        if (lse != nullptr && threadIdx.x == 0) lse[row] = attn_lse(sh.ms[g], sh.ls[g]);
#pragma unroll
        for (int i = 0; i < DIMS; i++) {
            const u32 d = DIMS * threadIdx.x + i;
            if (d < a.v_dim) orow[d] = acc[g][i] * inv;
        }
    }
}

extern "C" __global__ void paged_attention(float* out, float* lse, const float* q, const u16* kc,
                                           const u16* vc, const u32* tok_pos,
                                           const u32* tok_table, const u32* tables, AttnArgs a) {
    paged_attention_body<16, 2>(out, lse, q, kc, vc, tok_pos, tok_table, tables, a);
}

extern "C" __global__ void paged_attention_wide(float* out, float* lse, const float* q,
                                                const u16* kc, const u16* vc, const u32* tok_pos,
                                                const u32* tok_table, const u32* tables,
                                                AttnArgs a) {
    paged_attention_body<8, 4>(out, lse, q, kc, vc, tok_pos, tok_table, tables, a);
}

// Split-K ("flash decoding") for steps with too few blocks to fill the GPU: each token's
// attended positions are cut into gridDim.z equal runs, one block per run, and
// `attention_combine` merges them. Grid: (tokens, num_kv_heads * head_groups, splits); block and
// shared memory as `paged_attention`. Writes, for row r = t * num_heads + h and split s:
// part_acc[(r * splits + s) * v_dim + d] (unnormalised) and part_ml[(r * splits + s) * 2 + {0, 1}]
// = (max, sum).
template <int HEADS, int DIMS>
__device__ void paged_attention_split_body(float* part_acc, float* part_ml, const float* q,
                                           const u16* kc, const u16* vc, const u32* tok_pos,
                                           const u32* tok_table, const u32* tables,
                                           const AttnArgs& a) {
    extern __shared__ float smem[];
    const AttnShared sh = attn_shared(smem, a);
    const AttnBlock blk = attn_block(a);
    attn_load_queries(sh, q, blk, a);
    const u32 s = blockIdx.z, splits = gridDim.z;
    const u32 pos = tok_pos[blk.t];
    const u32 lo = attn_first(pos, a), hi = attn_end(pos, a);
    const u32 per = (hi - lo + splits - 1) / splits;
    const u32 from = min(lo + s * per, hi);
    const u32 end = min(from + per, hi);
    float acc[HEADS][DIMS];
    attend_run<HEADS, DIMS>(acc, sh, blk, kc, vc, tables + tok_table[blk.t], from, end, a);
#pragma unroll
    for (int g = 0; g < HEADS; g++) {
        if (g >= blk.gn) break;
        const u64 part = ((u64)blk.t * a.num_heads + blk.h0 + g) * splits + s;
#pragma unroll
        for (int i = 0; i < DIMS; i++) {
            const u32 d = DIMS * threadIdx.x + i;
            if (d < a.v_dim) part_acc[part * a.v_dim + d] = acc[g][i];
        }
        if (threadIdx.x == 0) {
            part_ml[part * 2] = sh.ms[g];
            part_ml[part * 2 + 1] = sh.ls[g];
        }
    }
}

extern "C" __global__ void paged_attention_split(float* part_acc, float* part_ml, const float* q,
                                                 const u16* kc, const u16* vc,
                                                 const u32* tok_pos, const u32* tok_table,
                                                 const u32* tables, AttnArgs a) {
    paged_attention_split_body<16, 2>(part_acc, part_ml, q, kc, vc, tok_pos, tok_table, tables,
                                      a);
}

extern "C" __global__ void paged_attention_split_wide(float* part_acc, float* part_ml,
                                                      const float* q, const u16* kc,
                                                      const u16* vc, const u32* tok_pos,
                                                      const u32* tok_table, const u32* tables,
                                                      AttnArgs a) {
    paged_attention_split_body<8, 4>(part_acc, part_ml, q, kc, vc, tok_pos, tok_table, tables,
                                     a);
}

// Merges the splits of `paged_attention_split`: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M)
// l_s with M the largest m_s (empty splits, max -inf, weigh 0; a row whose splits are all empty,
// none of its positions in the key range, is zeros). `lse`, unless null, receives each row's
// log-sum-exp. Grid: one block per (token, head) row; `rows` = tokens * num_heads.
extern "C" __global__ void attention_combine(float* out, float* lse, const float* part_acc,
                                             const float* part_ml, u32 splits, u32 v_dim) {
    const u64 row = blockIdx.x;
    const float* ml = part_ml + row * splits * 2;
    float mx = NEG_INF;
    for (u32 s = 0; s < splits; s++) mx = fmaxf(mx, ml[2 * s]);
    const float ref = mx == NEG_INF ? 0.0f : mx;  // keeps exp() from NaN on an empty row
    float l = 0.0f;
    for (u32 s = 0; s < splits; s++) l += ml[2 * s + 1] * expf(ml[2 * s] - ref);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (u32 d = threadIdx.x; d < v_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (u32 s = 0; s < splits; s++) {
            acc += part_acc[(row * splits + s) * v_dim + d] * expf(ml[2 * s] - ref);
        }
        out[row * v_dim + d] = acc * inv;
    }
    if (lse != nullptr && threadIdx.x == 0) lse[row] = attn_lse(mx, l);
}

// Folds one part of an attention into another over disjoint keys (cuda/context.rs): for each
// (token, head) row, out = (e^(a - M) out + e^(b - M) part) / (e^(a - M) + e^(b - M)) and
// lse = M + log of that sum, with a, b the parts' log-sum-exps and M the larger (a row neither
// part attended stays zeros, -inf). Grid: one block per row; `rows` = tokens * num_heads.
extern "C" __global__ void merge_attention(float* out, float* lse, const float* part,
                                           const float* part_lse, u32 v_dim) {
    const u64 row = blockIdx.x;
    const float a = lse[row], b = part_lse[row], m = fmaxf(a, b);
    if (m == NEG_INF) return;
    const float wa = expf(a - m), wb = expf(b - m), sum = wa + wb;
    for (u32 d = threadIdx.x; d < v_dim; d += blockDim.x) {
        const u64 i = row * v_dim + d;
        out[i] = (out[i] * wa + part[i] * wb) / sum;
    }
    __syncthreads();  // every thread has read lse[row] before it is replaced
    if (threadIdx.x == 0) lse[row] = m + logf(sum);
}
