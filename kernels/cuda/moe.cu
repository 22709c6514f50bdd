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
