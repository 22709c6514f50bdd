// Elementwise and row-wise kernels (f32 activations; weights widened from their stored dtype).
// Each mirrors a function of kernels/src/cpu/ops.rs or kernels/src/cpu/mod.rs.

// out[t, :] = table[ids[t], :], widened to f32. Grid: one block per token.
// An id outside the vocabulary (a graph replays ids the host checked only when it wrote them)
// reads nothing and yields a NaN row, which no sampler mistakes for a token.
extern "C" __global__ void embedding(float* out, const void* table, const u32* ids, int dtype,
                                     u32 hidden, u32 vocab) {
    const u32 id = ids[blockIdx.x];
    const u64 row = (u64)id * hidden;
    for (u32 c = threadIdx.x; c < hidden; c += blockDim.x) {
        out[(u64)blockIdx.x * hidden + c] =
            id < vocab ? load_elem(table, dtype, row + c) : __int_as_float(0x7fc00000);
    }
}

// f32 activations to 16-bit for cuBLAS (dtype DT_F16 or DT_BF16), so the product runs on
// tensor cores with the weight in its stored type.
extern "C" __global__ void to_half(u16* out, const float* x, u32 n, int dtype) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = dtype == DT_F16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
}

// y[r, c] += b[c]. Grid covers rows*n.
extern "C" __global__ void add_bias(float* y, const float* b, u32 rows, u32 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (u64)rows * n) y[i] += b[i % n];
}

// RMSNorm over groups of `g` columns, f32 throughout like transformers. One block per group.
extern "C" __global__ void rms_norm(float* out, const float* x, const float* w, u32 g, float eps) {
    const float* xs = x + (u64)blockIdx.x * g;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < g; c += blockDim.x) ss += xs[c] * xs[c];
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)g + eps);
    for (u32 c = threadIdx.x; c < g; c += blockDim.x) {
        out[(u64)blockIdx.x * g + c] = w[c] * (xs[c] * inv);
    }
}

// x += y, then out = RMSNorm(x) over groups of `g` columns: a residual add and the next
// pre-norm in one pass. Same arithmetic as add_assign followed by rms_norm. One block per group.
extern "C" __global__ void add_rms_norm(float* out, float* x, const float* y, const float* w,
                                        u32 g, float eps) {
    float* xs = x + (u64)blockIdx.x * g;
    const float* ys = y + (u64)blockIdx.x * g;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < g; c += blockDim.x) {
        const float v = xs[c] + ys[c];
        xs[c] = v;
        ss += v * v;
    }
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)g + eps);
    for (u32 c = threadIdx.x; c < g; c += blockDim.x) {
        out[(u64)blockIdx.x * g + c] = w[c] * (xs[c] * inv);  // xs[c]: this thread's own write
    }
}

extern "C" __global__ void add_assign(float* x, const float* y, u32 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void silu_mul(float* out, const float* gate, const float* up, u32 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x[r, :] *= sigmoid(g[r]).
extern "C" __global__ void mul_sigmoid_rows(float* x, const float* g, u32 rows, u32 cols) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (u64)rows * cols) x[i] *= 1.0f / (1.0f + expf(-g[i / cols]));
}

// out[r, c] = x[r, start + c] for c < len.
extern "C" __global__ void narrow_cols(float* out, const float* x, u32 rows, u32 cols, u32 start,
                                       u32 len) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (u64)rows * len) out[i] = x[(i / len) * cols + start + i % len];
}

// The inverse of narrow_cols: x's `len` columns into columns start.. of the `cols`-wide out.
extern "C" __global__ void write_cols(float* out, const float* x, u32 rows, u32 cols, u32 start,
                                      u32 len) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (u64)rows * len) out[(i / len) * cols + start + i % len] = x[i];
}

// Each (a+b)-wide head of x goes to an a-wide head of xa and a b-wide head of xb.
// `units` = rows * heads.
extern "C" __global__ void split_heads(float* xa, float* xb, const float* x, u32 units, u32 a,
                                       u32 b) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 w = a + b;
    if (i >= (u64)units * w) return;
    const u64 u = i / w;
    const u32 c = i % w;
    if (c < a) xa[u * a + c] = x[i];
    else xb[u * b + c - a] = x[i];
}

// out[r, h, :] = concat(a[r, h, :da], b[r, h, :db]); `units` = rows * heads. The inverse of
// split_heads.
extern "C" __global__ void concat_heads(float* out, const float* a, const float* b, u32 units,
                                        u32 da, u32 db) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 w = da + db;
    if (i >= (u64)units * w) return;
    const u64 u = i / w;
    const u32 c = i % w;
    out[i] = c < da ? a[u * da + c] : b[u * db + c - da];
}

// out[r, h, :] = concat(a[r, h, :da], s[r, :ds]): a part every head shares (MLA's rotary key).
// `units` = rows * heads.
extern "C" __global__ void concat_heads_shared(float* out, const float* a, const float* s,
                                               u32 units, u32 heads, u32 da, u32 ds) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 w = da + ds;
    if (i >= (u64)units * w) return;
    const u64 u = i / w;
    const u32 c = i % w;
    out[i] = c < da ? a[u * da + c] : s[(u / heads) * ds + c - da];
}

// out[i, :] = x[rows[i], :]. Grid: one block per output row.
extern "C" __global__ void gather_rows(float* out, const float* x, const u32* rows, u32 cols) {
    const u64 src = (u64)rows[blockIdx.x] * cols;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        out[(u64)blockIdx.x * cols + c] = x[src + c];
    }
}

// out[rows[i], :] += w[i] * y[i, :]. Rows are distinct within one launch (a token picks an expert
// once), so no atomics are needed; launches on the one stream run in order.
extern "C" __global__ void scatter_add_rows(float* out, const float* y, const u32* rows,
                                            const float* w, u32 cols) {
    const u64 dst = (u64)rows[blockIdx.x] * cols;
    const float s = w[blockIdx.x];
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        out[dst + c] += s * y[(u64)blockIdx.x * cols + c];
    }
}

// Scalars of `rope`; the layout of `RopeArgs` in cuda/ops.rs.
struct RopeArgs {
    u32 rows, cols, half, num_heads, head_stride, offset;
    u32 interleaved;
};

// Rotates pair i of head h of token t by the token's angle i (cos/sin precomputed per token,
// `[rows, half]`). Half layout pairs (i, i+half); interleaved pairs (2i, 2i+1).
extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, RopeArgs a) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)a.rows * a.num_heads * a.half) return;
    const u32 p = i % a.half;
    const u64 th = i / a.half;
    const u32 h = th % a.num_heads;
    const u64 t = th / a.num_heads;
    float* head = x + t * a.cols + (u64)h * a.head_stride + a.offset;
    const u32 ia = a.interleaved ? 2 * p : p;
    const u32 ib = a.interleaved ? 2 * p + 1 : p + a.half;
    const float c = cos_t[t * a.half + p], s = sin_t[t * a.half + p];
    const float x1 = head[ia], x2 = head[ib];
    head[ia] = x1 * c - x2 * s;
    head[ib] = x2 * c + x1 * s;
}

// RMSNorm of each head (`a.head_stride` columns, the norm weight's length; heads fill the row)
// followed by RoPE as `rope` applies it: the same arithmetic as rms_norm then rope, in one pass.
// One block per (token, head); blockDim.x a multiple of 32.
extern "C" __global__ void norm_rope(float* out, const float* x, const float* w,
                                     const float* cos_t, const float* sin_t, float eps,
                                     RopeArgs a) {
    const u64 t = blockIdx.x / a.num_heads;
    const u32 g = a.head_stride;
    const float* xs = x + (u64)blockIdx.x * g;
    float* os = out + (u64)blockIdx.x * g;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < g; c += blockDim.x) ss += xs[c] * xs[c];
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)g + eps);
    const u32 rot_end = a.offset + 2 * a.half;
    for (u32 c = threadIdx.x; c < g; c += blockDim.x) {
        if (c < a.offset || c >= rot_end) os[c] = w[c] * (xs[c] * inv);
    }
    for (u32 p = threadIdx.x; p < a.half; p += blockDim.x) {
        const u32 ia = a.offset + (a.interleaved ? 2 * p : p);
        const u32 ib = a.offset + (a.interleaved ? 2 * p + 1 : p + a.half);
        const float c = cos_t[t * a.half + p], s = sin_t[t * a.half + p];
        const float x1 = w[ia] * (xs[ia] * inv), x2 = w[ib] * (xs[ib] * inv);
        os[ia] = x1 * c - x2 * s;
        os[ib] = x2 * c + x1 * s;
    }
}

// The warp's largest (value, index) pair, the lowest index among equal values; every lane gets it.
__device__ __forceinline__ void warp_argmax(float& bv, u32& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
}

// Per row of x [rows, cols]: out[3r] = the index of its largest value (ties: the lowest index) as
// raw bits, out[3r+1] = that value, out[3r+2] = log(sum exp(x - max)) + max. What greedy decoding
// needs (RowSummary), so a step copies three numbers per row instead of the vocabulary.
// Grid: one block per row; blockDim.x a multiple of 32.
extern "C" __global__ void row_argmax_lse(float* out, const float* x, u32 cols) {
    __shared__ float best_v[32];
    __shared__ u32 best_i[32];
    const float* row = x + (u64)blockIdx.x * cols;
    // Each thread's maximum, its first index, and its sum of exp relative to that maximum.
    // A row of -inf (every token masked) keeps index 0, as on the host.
    float m = NEG_INF, s = 0.0f;
    u32 mi = threadIdx.x < cols ? threadIdx.x : 0xffffffffu;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = row[c];
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
            mi = c;
        } else if (v != NEG_INF) {
            s += expf(v - m);
        }
    }
    // The block's maximum and its lowest index: a warp reduction of (value, index) pairs, then
    // one over the warps.
    float bv = m;
    u32 bi = mi;
    warp_argmax(bv, bi);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = lane < warps ? best_v[lane] : NEG_INF;
        bi = lane < warps ? best_i[lane] : 0xffffffffu;
        warp_argmax(bv, bi);
        if (lane == 0) {
            best_v[0] = bv;
            best_i[0] = bi;
        }
    }
    __syncthreads();
    const float mx = best_v[0];
    // A thread that saw nothing (m = -inf) adds 0.
    const float total = block_sum(m == NEG_INF ? 0.0f : s * expf(m - mx));
    if (threadIdx.x == 0) {
        out[3 * (u64)blockIdx.x] = __uint_as_float(best_i[0]);
        out[3 * (u64)blockIdx.x + 1] = mx;
        out[3 * (u64)blockIdx.x + 2] = mx + logf(total);
    }
}
