//! Launch decisions of the CUDA backend that are pure arithmetic, kept out of the `cuda` feature
//! so that they are unit-tested in every build.

/// Threads per attention block (`ATTN_THREADS` of attention.cu), also the positions one chunk of
/// its online softmax covers.
pub const ATTN_THREADS: usize = 128;
/// Most query heads one attention block serves (`ATTN_HEADS` of attention.cu).
pub const ATTN_MAX_HEADS_PER_BLOCK: usize = 16;
/// Largest value head the attention kernels accumulate: two output dims per thread.
pub const ATTN_MAX_V_DIM: usize = 2 * ATTN_THREADS;
/// Dynamic shared memory a kernel may use without opting in to more (every GPU since Volta).
const SHARED_LIMIT: usize = 48 * 1024;

/// How an attention step's query heads are spread over blocks: each KV head's group of query
/// heads (grouped-query attention) is cut into `head_groups` blocks of at most `group_heads`
/// heads, and each block reads its KV head's keys and values once for all of its heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnGrouping {
    pub head_groups: usize,
    pub group_heads: usize,
    /// Dynamic shared memory of one block (`AttnShared` of attention.cu).
    pub shared_bytes: usize,
}

/// The fewest blocks per KV head that serve `group` query heads of `qk_dim` each within the
/// kernel's register and shared-memory bounds, heads spread evenly over them; `None` if even one
/// head per block does not fit (a `qk_dim` in the thousands).
pub fn attention_grouping(group: usize, qk_dim: usize) -> Option<AttnGrouping> {
    let shared = |heads: usize| (2 * ATTN_THREADS + heads * (qk_dim + ATTN_THREADS + 3)) * 4;
    let group = group.max(1);
    (group.div_ceil(ATTN_MAX_HEADS_PER_BLOCK)..=group).find_map(|blocks| {
        let heads = group.div_ceil(blocks);
        let shared_bytes = shared(heads);
        (shared_bytes <= SHARED_LIMIT).then_some(AttnGrouping {
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
        let g = |group, qk| attention_grouping(group, qk).unwrap();
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
        assert_eq!(attention_grouping(1, 20_000), None);
    }
}
