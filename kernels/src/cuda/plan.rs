//! Launch decisions of the CUDA backend that are pure arithmetic, kept out of the `cuda` feature
//! so that they are unit-tested in every build.

/// Threads per attention block (`ATTN_THREADS` of attention.cu), also the positions one chunk of
/// its online softmax covers.
pub const ATTN_THREADS: usize = 128;
/// The two instantiations of the attention kernels (attention.cu): each thread accumulates
/// `dims` output dims for up to `heads` query heads, so both keep 32 accumulators per thread.
/// The wide one serves value heads up to 512 (MLA's latent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// `paged_attention` / `paged_attention_split`: 16 heads, 2 dims per thread.
    Narrow,
    /// `paged_attention_wide` / `paged_attention_split_wide`: 8 heads, 4 dims per thread.
    Wide,
}

impl AttnKernel {
    /// The instantiation whose threads cover `v_dim`; `None` past the wide one.
    pub fn for_v_dim(v_dim: usize) -> Option<AttnKernel> {
        [AttnKernel::Narrow, AttnKernel::Wide]
            .into_iter()
            .find(|k| v_dim <= k.max_v_dim())
    }

    /// Most query heads one block serves.
    pub fn max_heads(self) -> usize {
        match self {
            AttnKernel::Narrow => 16,
            AttnKernel::Wide => 8,
        }
    }

    /// Largest value head: `dims` output dims per thread.
    pub fn max_v_dim(self) -> usize {
        match self {
            AttnKernel::Narrow => 2 * ATTN_THREADS,
            AttnKernel::Wide => 4 * ATTN_THREADS,
        }
    }

    /// The kernel names: plain and split-K.
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            AttnKernel::Narrow => ("paged_attention", "paged_attention_split"),
            AttnKernel::Wide => ("paged_attention_wide", "paged_attention_split_wide"),
        }
    }
}

/// Largest value head any attention kernel accumulates.
pub const ATTN_MAX_V_DIM: usize = 4 * ATTN_THREADS;
/// Dynamic shared memory a kernel may use without opting in to more (every GPU since Volta).
const SHARED_LIMIT: usize = 48 * 1024;

/// How an attention step's query heads are spread over blocks: each KV head's group of query
/// heads (grouped-query attention) is cut into `head_groups` blocks of at most `group_heads`
/// heads, and each block reads its KV head's keys and values once for all of its heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnGrouping {
    pub kernel: AttnKernel,
    pub head_groups: usize,
    pub group_heads: usize,
    /// Dynamic shared memory of one block (`AttnShared` of attention.cu).
    pub shared_bytes: usize,
}

/// The kernel for `v_dim` and the fewest blocks per KV head that serve `group` query heads of
/// `qk_dim` each within its register and shared-memory bounds, heads spread evenly over them;
/// `None` if the value head is too wide for any kernel or even one head per block does not fit
/// (a `qk_dim` in the thousands).
pub fn attention_grouping(group: usize, qk_dim: usize, v_dim: usize) -> Option<AttnGrouping> {
    let kernel = AttnKernel::for_v_dim(v_dim)?;
    let shared = |heads: usize| (2 * ATTN_THREADS + heads * (qk_dim + ATTN_THREADS + 3)) * 4;
    let group = group.max(1);
    (group.div_ceil(kernel.max_heads())..=group).find_map(|blocks| {
        let heads = group.div_ceil(blocks);
        let shared_bytes = shared(heads);
        (shared_bytes <= SHARED_LIMIT).then_some(AttnGrouping {
            kernel,
            // Recounted so that no block is left without a head (9 heads in 4 blocks of 3).
            head_groups: group.div_ceil(heads),
            group_heads: heads,
            shared_bytes,
        })
    })
}

/// Positions one split of a decode attention row should cover at least: below this, the extra
/// launch and the merge cost more than the parallelism gains (two chunks of the kernel's 128
/// threads).
pub const MIN_POSITIONS_PER_SPLIT: usize = 256;
/// Most splits of one row: the merge reads `splits` partial rows per output.
pub const MAX_ATTENTION_SPLITS: usize = 32;

/// How many runs to cut each block's positions into (split-K, "flash decoding"); 1 means the plain
/// kernel. A step of `rows` blocks (tokens × KV heads × head groups) whose longest attended span
/// is `max_span` positions is split only when it has fewer blocks than two per multiprocessor
/// (decode at small batch) and each split keeps at least [`MIN_POSITIONS_PER_SPLIT`] positions;
/// then into as many splits as bring the block count to about two per multiprocessor, at most
/// [`MAX_ATTENTION_SPLITS`].
pub fn attention_splits(rows: usize, max_span: usize, multiprocessors: usize) -> usize {
    let target_blocks = 2 * multiprocessors.max(1);
    if rows == 0 || rows >= target_blocks {
        return 1;
    }
    let by_occupancy = target_blocks.div_ceil(rows);
    let by_length = max_span / MIN_POSITIONS_PER_SPLIT;
    by_occupancy.min(by_length).clamp(1, MAX_ATTENTION_SPLITS)
}

/// Threads per block of the tiled prompt kernels (`PF_THREADS` of prefill.cu): four warps.
pub const PREFILL_THREADS: usize = 128;
/// Tokens per tile of a prompt step's tile list (`PF_TILE` of prefill.cu): each sequence's new
/// tokens are cut into runs of at most this many.
pub const PREFILL_TILE_TOKENS: usize = 64;
/// Fewest tokens per tile, on average, for the tiled kernel to serve a step. A decode step has one
/// token per sequence, so one per tile, and a tiled block would compute 64 rows for it; the
/// decode kernels serve such steps. A chunked prefill beside a few decodes stays above this.
pub const PREFILL_MIN_TOKENS_PER_TILE: usize = 8;
/// Widest key and value heads of the tiled kernels: their registers hold a warp's queries and
/// outputs whole.
pub const PREFILL_MAX_QK_DIM: usize = 192;
pub const PREFILL_MAX_V_DIM: usize = 128;

/// The instantiations of the tiled prompt kernel (prefill.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// `prefill_attention`: keys up to 128 wide.
    Narrow,
    /// `prefill_attention_wide`: keys up to 192 wide (MLA's expanded form).
    Wide,
}

impl PrefillKernel {
    pub fn name(self) -> &'static str {
        match self {
            PrefillKernel::Narrow => "prefill_attention",
            PrefillKernel::Wide => "prefill_attention_wide",
        }
    }
}

/// How the tiled kernel spreads a step: `heads_per_block` query heads of one KV head per block
/// (each with `PREFILL_TILE_TOKENS / heads_per_block` tokens, a warp per 16), and
/// `head_blocks` blocks per KV head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    pub kernel: PrefillKernel,
    pub heads_per_block: usize,
    pub head_blocks: usize,
}

/// What decides whether a step's attention takes the tiled kernel.
#[derive(Clone, Copy, Debug)]
pub struct PrefillShape {
    /// Query heads per KV head.
    pub group: usize,
    pub qk_dim: usize,
    pub v_dim: usize,
    /// Elements between value rows in the cache (`v_dim`, or `qk_dim` when values are a prefix
    /// of the keys).
    pub v_stride: usize,
    /// The device's compute capability: the tensor-core instructions need 8.0.
    pub compute_capability: (i32, i32),
    pub tokens: usize,
    pub tiles: usize,
}

/// Whether a device of compute capability `cc` has the tensor-core instructions the tiled kernels
/// use (`mma.sync` m16n8k8 on tf32: Ampere, sm_80, and later).
pub fn has_tf32_mma(cc: (i32, i32)) -> bool {
    cc.0 >= 8
}

/// The tiled plan for a step, or `None` where the decode kernels serve it: a device older than
/// Ampere, heads wider than the tiled kernels hold or not a multiple of 8 (their 16-byte loads
/// and 8-wide products), or too few tokens per tile (decode).
pub fn prefill_plan(s: PrefillShape) -> Option<PrefillPlan> {
    let eights = [s.qk_dim, s.v_dim, s.v_stride].iter().all(|d| d % 8 == 0);
    let dense = s.tiles > 0 && s.tokens >= PREFILL_MIN_TOKENS_PER_TILE * s.tiles;
    if !has_tf32_mma(s.compute_capability)
        || !eights
        || !dense
        || s.qk_dim == 0
        || s.v_dim == 0
        || s.v_dim > PREFILL_MAX_V_DIM
        || s.qk_dim > PREFILL_MAX_QK_DIM
    {
        return None;
    }
    let kernel = if s.qk_dim <= 128 {
        PrefillKernel::Narrow
    } else {
        PrefillKernel::Wide
    };
    // Four heads share a block's loads when the group has them; a lone head takes 64 tokens.
    let heads_per_block = match s.group.max(1) {
        1 => 1,
        2 => 2,
        _ => 4,
    };
    Some(PrefillPlan {
        kernel,
        heads_per_block,
        head_blocks: s.group.max(1).div_ceil(heads_per_block),
    })
}

/// Each sequence's new tokens cut into tiles of at most [`PREFILL_TILE_TOKENS`]: `(first token,
/// tokens)` pairs, in step order, for sequences of `tokens` new tokens each.
pub fn prefill_tiles(tokens: impl IntoIterator<Item = usize>) -> Vec<(usize, usize)> {
    let mut tiles = Vec::new();
    let mut start = 0;
    for n in tokens {
        for c in (0..n).step_by(PREFILL_TILE_TOKENS) {
            tiles.push((start + c, (n - c).min(PREFILL_TILE_TOKENS)));
        }
        start += n;
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(group: usize, qk_dim: usize, v_dim: usize, tokens: usize) -> PrefillShape {
        PrefillShape {
            group,
            qk_dim,
            v_dim,
            v_stride: v_dim,
            compute_capability: (9, 0),
            tokens,
            tiles: tokens.div_ceil(PREFILL_TILE_TOKENS),
        }
    }

    #[test]
    fn prompt_steps_take_the_tiled_kernel_where_it_fits() {
        // Qwen3-30B-A3B: 8 heads per KV head -> 2 blocks of 4 heads.
        let qwen = prefill_plan(shape(8, 128, 128, 2048)).unwrap();
        assert_eq!(qwen.kernel, PrefillKernel::Narrow);
        assert_eq!((qwen.heads_per_block, qwen.head_blocks), (4, 2));
        // DeepSeek's expanded MLA: 192-wide keys, one head per KV head.
        let mla = prefill_plan(shape(1, 192, 128, 512)).unwrap();
        assert_eq!(mla.kernel, PrefillKernel::Wide);
        assert_eq!((mla.heads_per_block, mla.head_blocks), (1, 1));
        // Odd groups round up to whole blocks: 3 -> one block with an idle warp, 5 -> two.
        assert_eq!(prefill_plan(shape(3, 64, 64, 100)).unwrap().head_blocks, 1);
        assert_eq!(prefill_plan(shape(5, 64, 64, 100)).unwrap().head_blocks, 2);
        assert_eq!(
            prefill_plan(shape(2, 64, 64, 100)).unwrap().heads_per_block,
            2
        );
    }

    #[test]
    fn decode_old_devices_and_odd_heads_keep_the_decode_kernels() {
        // 64 sequences of one token: 64 tiles of 1.
        let decode = PrefillShape {
            tiles: 64,
            ..shape(8, 128, 128, 64)
        };
        assert_eq!(prefill_plan(decode), None);
        // A chunk of 512 beside 63 decodes: 8 + 63 tiles for 575 tokens, just above 8 per tile.
        let mixed = PrefillShape {
            tiles: 71,
            ..shape(8, 128, 128, 575)
        };
        assert!(prefill_plan(mixed).is_some());
        let turing = PrefillShape {
            compute_capability: (7, 5),
            ..shape(8, 128, 128, 2048)
        };
        assert_eq!(prefill_plan(turing), None);
        // MLA's absorbed form (576-wide keys, 512-wide values), odd widths, too-wide heads.
        assert_eq!(prefill_plan(shape(16, 576, 512, 2048)), None);
        assert_eq!(prefill_plan(shape(4, 20, 256, 2048)), None);
        assert_eq!(prefill_plan(shape(4, 36, 32, 2048)), None);
        assert_eq!(prefill_plan(shape(4, 256, 128, 2048)), None);
        let strided = PrefillShape {
            v_stride: 20,
            ..shape(1, 64, 16, 2048)
        };
        assert_eq!(prefill_plan(strided), None);
    }

    #[test]
    fn tiles_cut_each_sequence_separately() {
        assert_eq!(
            prefill_tiles([130, 1, 64]),
            vec![(0, 64), (64, 64), (128, 2), (130, 1), (131, 64)]
        );
        assert!(prefill_tiles([]).is_empty());
    }

    #[test]
    fn short_contexts_and_full_grids_are_not_split() {
        // Long enough, but 64 tokens x 8 KV heads (Mixtral) already fill 132 SMs.
        assert_eq!(attention_splits(64 * 8, 32_000, 132), 1);
        // One row, but too short to be worth a second pass.
        assert_eq!(attention_splits(1, 511, 132), 1);
        assert_eq!(attention_splits(0, 10_000, 132), 1);
    }

    #[test]
    fn decode_at_small_batch_is_split_up_to_the_bounds() {
        // 1 token x 32 blocks over 4096 positions: 264 / 32 rounds up to 9 splits by occupancy,
        // 16 by length.
        assert_eq!(attention_splits(32, 4096, 132), 9);
        // 1 token x 4 KV heads (Qwen3-30B-A3B's decode at batch 1): long contexts take 32 splits.
        assert_eq!(attention_splits(4, 16_384, 132), 32);
        // Length limits: 1000 positions allow 3 splits of at least 256.
        assert_eq!(attention_splits(2, 1000, 132), 3);
        // One row over a very long context: capped.
        assert_eq!(attention_splits(1, 1_000_000, 132), MAX_ATTENTION_SPLITS);
        // A device that reports no multiprocessors still gets a sane answer.
        assert_eq!(attention_splits(1, 4096, 0), 2);
    }

    #[test]
    fn grouped_query_heads_share_a_block_up_to_the_bounds() {
        let g = |group, qk| attention_grouping(group, qk, 128).unwrap();
        // Qwen3-30B-A3B: 32 query heads over 4 KV heads of 128, one block per KV head.
        let qwen = g(8, 128);
        assert_eq!((qwen.head_groups, qwen.group_heads), (1, 8));
        assert_eq!(qwen.shared_bytes, (256 + 8 * 259) * 4);
        // Multi-head attention (DeepSeek's expanded MLA, qk 192): a block per head.
        assert_eq!((g(1, 192).head_groups, g(1, 192).group_heads), (1, 1));
        // More heads than a block holds are spread evenly: 20 -> 2 blocks of 10, 40 -> 3 of 14.
        assert_eq!((g(20, 128).head_groups, g(20, 128).group_heads), (2, 10));
        assert_eq!((g(40, 64).head_groups, g(40, 64).group_heads), (3, 14));
        // Wide heads are limited by shared memory, never past it: 16 heads of 1024 need 73 KiB.
        let wide = g(16, 1024);
        assert_eq!((wide.head_groups, wide.group_heads), (2, 8));
        assert!(wide.shared_bytes <= SHARED_LIMIT, "{wide:?}");
        assert_eq!(attention_grouping(1, 20_000, 128), None);
    }

    #[test]
    fn wide_value_heads_take_the_wide_kernel_with_fewer_heads_per_block() {
        assert_eq!(g_kernel(256), Some(AttnKernel::Narrow));
        assert_eq!(g_kernel(257), Some(AttnKernel::Wide));
        assert_eq!(g_kernel(512), Some(AttnKernel::Wide));
        assert_eq!(g_kernel(513), None);
        // DeepSeek-V3's latent attention at 8-way tensor parallelism: 16 query heads on the one
        // latent "KV head" of 576 (512 latent + 64 rotary), values the 512-wide latent.
        let mla = attention_grouping(16, 576, 512).unwrap();
        assert_eq!(mla.kernel, AttnKernel::Wide);
        assert_eq!((mla.head_groups, mla.group_heads), (2, 8));
        assert!(mla.shared_bytes <= SHARED_LIMIT, "{mla:?}");
        assert_eq!(attention_grouping(16, 576, 513), None);
    }

    fn g_kernel(v_dim: usize) -> Option<AttnKernel> {
        attention_grouping(1, 64, v_dim).map(|g| g.kernel)
    }
}
