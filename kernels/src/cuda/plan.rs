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

#[cfg(test)]
mod tests {
    use super::*;

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
