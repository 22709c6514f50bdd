//! Expert-parallel shards: a worker reads only the experts it owns, and the partial MoE outputs of
//! disjoint shards add up to the whole layer's output.

mod common;

use std::collections::BTreeSet;

use tessera_common::{FfnSpec, ShardSpec, load_model_spec};
use tessera_kernels::Backend;
use tessera_kernels::cpu::CpuBackend;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::layers::{Moe, TpContext, WeightLoader};
use tessera_worker::model::Model;

fn owning(spec: &tessera_common::ModelSpec, experts: std::ops::Range<usize>) -> ShardSpec {
    let set: BTreeSet<(usize, usize)> = (0..spec.layers.len())
        .flat_map(|l| experts.clone().map(move |e| (l, e)))
        .collect();
    ShardSpec {
        rank: 0,
        world_size: 1,
        experts: Some(set),
    }
}

#[test]
fn a_shard_never_reads_experts_it_does_not_own() {
    let dir = common::fixtures_dir().join("qwen3_moe");
    let spec = load_model_spec(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    Model::load(CpuBackend, spec.clone(), &ckpt, &owning(&spec, 0..4)).unwrap();
    let touched = ckpt.touched();
    assert!(
        touched.iter().any(|n| n.contains(".experts.3.")),
        "owned experts are loaded"
    );
    for e in 4..8 {
        let needle = format!(".experts.{e}.");
        assert!(
            !touched.iter().any(|n| n.contains(&needle)),
            "expert {e} was read"
        );
    }
}

#[test]
fn disjoint_expert_shards_sum_to_the_whole_layer() {
    let dir = common::fixtures_dir().join("qwen3_moe");
    let spec = load_model_spec(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let (layer, moe_spec) = spec
        .layers
        .iter()
        .enumerate()
        .find_map(|(i, l)| match &l.ffn {
            FfnSpec::Moe(m) => Some((i, m.clone())),
            FfnSpec::Dense(_) => None,
        })
        .unwrap();
    let b = CpuBackend;
    let hidden = spec.hidden_size;
    let tokens = 5;
    let x: Vec<f32> = (0..tokens * hidden)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let x = b.tensor_from_host(x, tokens, hidden).unwrap();
    let run = |shard: &ShardSpec| {
        let loader = WeightLoader::new(&b, &ckpt, 0);
        let tp = TpContext {
            shard: shard.clone(),
            ..TpContext::single()
        };
        let moe = Moe::load(&loader, &moe_spec, layer, hidden, &tp).unwrap();
        let (y, counts) = moe.forward(&b, &x).unwrap();
        (b.tensor_to_host(&y).unwrap(), counts)
    };
    let (whole, counts) = run(&ShardSpec::whole());
    let (low, _) = run(&owning(&spec, 0..3));
    let (high, _) = run(&owning(&spec, 3..8));
    assert_eq!(
        counts.iter().sum::<u32>() as usize,
        tokens * moe_spec.top_k,
        "counts add up to tokens × top-k"
    );
    for ((w, l), h) in whole.iter().zip(&low).zip(&high) {
        assert!((w - (l + h)).abs() < 1e-5, "{w} != {l} + {h}");
    }
    assert!(
        low.iter().any(|v| *v != 0.0) && high.iter().any(|v| *v != 0.0),
        "both shards did work"
    );
}
