//! Launch decisions of the CUDA backend that are pure arithmetic, kept out of the `cuda` feature
//! so that they are unit-tested in every build.

/// Positions one split of a decode attention row should cover at least: below this, the extra
/// launch and the merge cost more than the parallelism gains (two chunks of the kernel's 128
/// threads).
pub const MIN_POSITIONS_PER_SPLIT: usize = 256;
/// Most splits of one row: the merge reads `splits` partial rows per output.
pub const MAX_ATTENTION_SPLITS: usize = 32;

/// How many runs to cut each (token, head) row of an attention step into (split-K, "flash
/// decoding"); 1 means the plain kernel. A step of `rows` = tokens × heads rows whose longest
/// attended span is `max_span` positions is split only when it has fewer rows than two blocks per
/// multiprocessor (decode at small batch) and each split keeps at least
/// [`MIN_POSITIONS_PER_SPLIT`] positions; then into as many splits as bring the block count to
/// about two per multiprocessor, at most [`MAX_ATTENTION_SPLITS`].
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
        // Long enough, but 64 tokens x 32 heads already fill 132 SMs.
        assert_eq!(attention_splits(64 * 32, 32_000, 132), 1);
        // One row, but too short to be worth a second pass.
        assert_eq!(attention_splits(1, 511, 132), 1);
        assert_eq!(attention_splits(0, 10_000, 132), 1);
    }

    #[test]
    fn decode_at_small_batch_is_split_up_to_the_bounds() {
        // 1 token x 32 heads over 4096 positions: 264 / 32 rounds up to 9 splits by occupancy,
        // 16 by length.
        assert_eq!(attention_splits(32, 4096, 132), 9);
        // Length limits: 1000 positions allow 3 splits of at least 256.
        assert_eq!(attention_splits(2, 1000, 132), 3);
        // One row over a very long context: capped.
        assert_eq!(attention_splits(1, 1_000_000, 132), MAX_ATTENTION_SPLITS);
        // A device that reports no multiprocessors still gets a sane answer.
        assert_eq!(attention_splits(1, 4096, 0), 2);
    }
}
