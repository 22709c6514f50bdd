//! Bodies of the cargo-fuzz targets over model configuration (`fuzz/fuzz_targets/config.rs`).
//!
//! They live here, behind the `fuzz-targets` feature, rather than in the fuzz crate so that
//! `tests/fuzz_regressions.rs` can feed them the checked-in regression inputs on stable Rust:
//! a crash the fuzzer once found stays a test in CI without a nightly toolchain. A target
//! returns normally for every input; a panic (or an abort from a runaway allocation) is the
//! finding.

use std::path::Path;

use crate::{GenerationConfig, PlacementMap, arch};

/// Largest rotary dimension whose inverse frequencies the target computes. The worker computes
/// them only after every weight matched the config, which bounds the head size by the
/// checkpoint; a config alone may claim any size.
const MAX_FUZZ_ROTARY_DIM: usize = 1 << 16;

/// `config.json` bytes → [`arch::model_spec_from_value`], then what the coordinator does with an
/// accepted spec before any weight is read: the tensor-parallel check and the expert placement
/// for a few world sizes, and the RoPE parameters. The same bytes are also read as a
/// `generation_config.json`.
pub fn model_config(data: &[u8]) {
    let _ = serde_json::from_slice::<GenerationConfig>(data);
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(spec) = arch::model_spec_from_value(Path::new("config.json"), &value) else {
        return;
    };
    for world in 1..=4 {
        if spec.check_tensor_parallel(world).is_ok() {
            let placement = PlacementMap::contiguous(&spec, world);
            if let Err(e) = placement.validate(&spec) {
                panic!("the default placement for {world} ranks is invalid: {e}");
            }
            for rank in 0..world {
                let _ = placement.shard(rank);
            }
            let _ = placement.experts_per_rank();
        }
    }
    let _ = spec.num_moe_layers();
    let _ = spec.rope.attention_scaling();
    let _ = spec.rope.deepseek_softmax_mscale();
    if spec.rope.rotary_dim <= MAX_FUZZ_ROTARY_DIM {
        assert_eq!(spec.rope.inv_freq().len(), spec.rope.rotary_dim / 2);
    }
}
