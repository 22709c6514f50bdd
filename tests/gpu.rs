//! End to end on a GPU (`--features cuda` and a runtime check): every fixture with `--device cuda`
//! gives transformers' greedy tokens (the ones the CPU gives, `tests/fixtures.rs`), in one
//! process and over two worker processes sharing the GPU; `serve` reports the GPU in
//! GetModelInfo and sizes its KV cache from `--gpu-memory-utilization`.
//!
//! Where there is no GPU (no driver, no device, or a build without the feature) each test prints
//! `SKIPPED: <reason>` and passes; `device::tests` checks the CPU-side behaviour of the flags.
//! CI runs them for real on the CPU emulator of the CUDA libraries and NCCL
//! (`tests/cuda-emulator`), which executes the CUDA backend and its kernels unchanged, but is no
//! evidence about a real GPU.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::staggered::Order;
use tessera_common::{ShardSpec, load_model_spec};
use tessera_kernels::cuda::CudaBackend;
use tessera_worker::device::{
    Device, DeviceConfig, DeviceKind, ExecutorPlan, GroupLink, KvSize, load_executor,
};
use tessera_worker::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_worker::layers::MlaPrefill;
use tessera_worker::profile::StepLimits;

/// Whether a GPU is here; prints why a test is skipped when not.
fn gpu_present(test: &str) -> bool {
    match CudaBackend::device_count() {
        Ok(n) if n > 0 => true,
        Ok(_) => {
            eprintln!("SKIPPED: {test}: the driver reports no CUDA device");
            false
        }
        Err(e) => {
            eprintln!("SKIPPED: {test}: {e}");
            false
        }
    }
}

fn cuda0() -> DeviceConfig {
    DeviceConfig {
        kind: DeviceKind::Cuda { ordinal: Some(0) },
        ..DeviceConfig::default()
    }
}

/// |Δ logprob| allowed on the GPU. The GPU stores the KV cache in bf16 whatever the checkpoint's
/// dtype (the CPU keeps f32), and products with 16-bit weights round the activations to the
/// weight's type for the tensor cores. Under the CPU emulator (tests/cuda-emulator), which
/// computes like the GPU but in host arithmetic, f32 fixtures differ from transformers by up to
/// 4.4e-2 and the bf16 one by 5.0e-2, all with transformers' greedy tokens; an f32-only bound of
/// 2e-3 failed there for every f32 fixture.
const GPU_LOGPROB_TOLERANCE: f32 = 1e-1;

#[test]
fn every_fixture_on_the_gpu_gives_transformers_greedy_tokens() {
    if !gpu_present("every_fixture_on_the_gpu_gives_transformers_greedy_tokens") {
        return;
    }
    let mut failures = Vec::new();
    // MLA fixtures also in each form alone (by default a fresh prompt expands, decode stays
    // absorbed; a step replayed from a graph is always absorbed).
    let runs = common::fixtures().into_iter().flat_map(|(name, dir)| {
        let mla = load_model_spec(&dir)
            .unwrap()
            .layers
            .iter()
            .any(|l| matches!(l.attention, tessera_common::AttentionSpec::Mla(_)));
        // The third run bounds the expanded form to 8 context rows with every head: longer
        // contexts expand 3, 2 or 1 heads per pass (the fixtures have 4). The last fits not
        // one head over a whole context: contexts are cut into chunks of one block (4
        // positions, up to 5 chunks), attended a head at a time and merged.
        let rows = |max_step_tokens| StepLimits {
            max_step_tokens,
            ..StepLimits::default()
        };
        let blocks_of_4 = EngineConfig {
            block_size: 4,
            ..EngineConfig::default()
        };
        let whole = EngineConfig::default();
        let forms: Vec<(MlaPrefill, StepLimits, EngineConfig, &str)> = if mla {
            vec![
                (MlaPrefill::Auto, StepLimits::default(), whole, ""),
                (MlaPrefill::Absorbed, StepLimits::default(), whole, ""),
                (MlaPrefill::Expanded, StepLimits::default(), whole, ""),
                (MlaPrefill::Expanded, rows(8), whole, ", in passes"),
                (MlaPrefill::Expanded, rows(1), blocks_of_4, ", in chunks"),
            ]
        } else {
            vec![(MlaPrefill::Auto, StepLimits::default(), whole, "")]
        };
        forms.into_iter().map(move |(f, limits, cache, cut)| {
            let label = format!("{name} ({f:?}{cut})");
            (label, dir.clone(), (f, limits), cache)
        })
    });
    for (name, dir, (mla_prefill, limits), cache) in runs {
        let reference = common::reference(&dir);
        let plan = ExecutorPlan {
            dir: &dir,
            shard: ShardSpec::whole(),
            link: GroupLink::Single,
            kv: KvSize::Blocks(cache.num_blocks),
            limits,
            block_size: cache.block_size,
            metrics: None,
            cuda_graph_max_batch: cuda0().cuda_graph_max_batch,
            mla_prefill,
        };
        let device = Device::open(&cuda0()).expect("the GPU opens");
        let runner = load_executor(device, plan)
            .unwrap_or_else(|e| panic!("{name}: loading on the GPU: {e}"))
            .runner;
        assert!(
            runner.backend().starts_with("cuda:0"),
            "{}",
            runner.backend()
        );
        let mut engine = Engine::with_runner(runner, cache);
        let tol = GPU_LOGPROB_TOLERANCE;
        for (ci, case) in reference.cases.iter().enumerate() {
            let req = GenerateRequest {
                prompt_logprobs: true,
                ..common::greedy_request(case)
            };
            let out = engine
                .generate(&req, |_| {})
                .unwrap_or_else(|e| panic!("{name} case {ci}: {e}"));
            if out.token_ids != case.greedy_ids {
                failures.push(format!(
                    "{name} case {ci}: tokens {:?} != {:?} (closest margin {:.3})",
                    out.token_ids, case.greedy_ids, case.min_margin
                ));
                continue;
            }
            let worst = out
                .logprobs
                .iter()
                .zip(&case.greedy_logprobs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("{name} case {ci}: max |Δ logprob| {worst:.2e}");
            if worst > tol {
                failures.push(format!(
                    "{name} case {ci}: max |Δ logprob| {worst:.2e} > {tol:.0e}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "GPU against transformers:\n{}",
        failures.join("\n")
    );
}

/// `tessera generate --device cuda --tp 2 --json` on the first case of fixture `name`, with `env`
/// added; checks the tokens against transformers' and returns the run's log (stderr).
fn generate_tp2(name: &str, env: &[(&str, &str)]) -> String {
    let dir = common::fixtures_dir().join(name);
    let case = &common::reference(&dir).cases[0];
    let ids: Vec<String> = case.prompt_ids.iter().map(u32::to_string).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("generate")
        .arg("--model")
        .arg(&dir)
        .args([
            "--device",
            "cuda",
            "--tp",
            "2",
            "--json",
            "--temperature",
            "0",
        ])
        .args(["--prompt-ids", &ids.join(",")])
        .args(["--max-tokens", &case.greedy_ids.len().to_string()])
        .envs(env.iter().copied())
        .output()
        .expect("tessera generate runs");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{name}: {log}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let got: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).unwrap();
    // Generation may stop early at eos; compare what was produced.
    assert_eq!(got[..], case.greedy_ids[..got.len()], "{name}");
    log
}

/// Continuous batching on the GPU: the cases of a fixture joining a step apart, each prompt in
/// two chunks beside the others' decodes, in arrival order and with the chunks listed first (an
/// MLA step then attends its decodes absorbed and its chunks expanded, reordered); every
/// sequence gives transformers' tokens. Tokens only: the GPU's bf16 caches move a hidden state
/// by ~1e-3, and the DeepSeek-V3 fixture has a router near-tie (at its third step, layer 1, the
/// second and third expert groups score 1.8875 and 1.8805 for the first sequence's token) that
/// such a move flips, changing that token's log-probability by 1.5 while it stays the argmax.
/// `tests/batching.rs` checks the same batches' log-probabilities on the CPU.
#[test]
fn mixed_batches_on_the_gpu_match_transformers() {
    if !gpu_present("mixed_batches_on_the_gpu_match_transformers") {
        return;
    }
    for (name, order) in [
        ("qwen3_moe", Order::Arrival),
        ("kimi_k2_style", Order::NewestFirst),
        ("deepseek_v2", Order::Arrival),
        ("deepseek_v2", Order::NewestFirst),
        ("deepseek_v3", Order::NewestFirst),
    ] {
        let dir = common::fixtures_dir().join(name);
        let plan = ExecutorPlan {
            dir: &dir,
            shard: ShardSpec::whole(),
            link: GroupLink::Single,
            kv: KvSize::Blocks(64),
            limits: StepLimits::default(),
            block_size: 4,
            metrics: None,
            cuda_graph_max_batch: cuda0().cuda_graph_max_batch,
            mla_prefill: MlaPrefill::Auto,
        };
        let device = Device::open(&cuda0()).expect("the GPU opens");
        let mut runner = load_executor(device, plan)
            .unwrap_or_else(|e| panic!("{name}: loading on the GPU: {e}"))
            .runner;
        let reference = common::reference(&dir);
        let label = format!("{name} ({order:?})");
        common::staggered::run(runner.as_mut(), &reference, (&label, order, None));
    }
}

/// `tessera generate --device cuda --tp 2`: two worker processes on the one GPU (their collective
/// staged through the host), each with half of --gpu-memory-utilization.
#[test]
fn two_worker_processes_on_the_gpu_give_the_same_tokens() {
    if !gpu_present("two_worker_processes_on_the_gpu_give_the_same_tokens") {
        return;
    }
    for name in ["mixtral", "qwen2_moe", "deepseek_v3"] {
        generate_tp2(name, &[]);
    }
}

/// `tessera generate --device cuda --tp 2` where each rank has a GPU of its own: the coordinator
/// hands out an NCCL id and the workers' all-reduces and all-gathers go through NCCL, with
/// transformers' tokens. Needs two GPUs and NCCL; under the CPU emulator, which has both
/// (`TESSERA_EMU_DEVICES=2`, its libnccl.so.2), the whole NCCL path runs in CI.
#[test]
fn ranks_with_a_gpu_each_go_through_nccl() {
    let test = "ranks_with_a_gpu_each_go_through_nccl";
    if !gpu_present(test) {
        return;
    }
    if let Err(e) = tessera_kernels::cuda::probe_nccl() {
        eprintln!("SKIPPED: {test}: {e}");
        return;
    }
    let device = tessera_kernels::Backend::name(&CudaBackend::new(0).expect("device 0 opens"));
    let emulated = device.contains("Tessera CUDA emulator");
    if !emulated && CudaBackend::device_count().unwrap_or(0) < 2 {
        eprintln!("SKIPPED: {test}: one GPU (NCCL needs a GPU per rank)");
        return;
    }
    let env: &[(&str, &str)] = if emulated {
        &[("TESSERA_EMU_DEVICES", "2")]
    } else {
        &[]
    };
    for name in ["mixtral", "qwen2_moe", "deepseek_v3"] {
        let log = generate_tp2(name, env);
        assert!(
            log.contains("NCCL collective"),
            "{name}: NCCL was not used:\n{log}"
        );
        assert!(
            log.contains("joined the NCCL group rank=1 world=2"),
            "{name}:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_names_the_gpu_and_sizes_the_kv_cache_from_utilization() {
    if !gpu_present("serve_names_the_gpu_and_sizes_the_kv_cache_from_utilization") {
        return;
    }
    use tessera_proto::v1 as pb;
    let dir = common::fixtures_dir().join("qwen2_moe");
    let case = &common::reference(&dir).cases[0];
    let mut blocks = Vec::new();
    for utilization in ["0.2", "0.4"] {
        let server = common::server::Server::start(
            &dir,
            &["--device", "cuda", "--gpu-memory-utilization", utilization],
        );
        let mut client = pb::tessera_client::TesseraClient::connect(server.grpc.clone())
            .await
            .expect("the gRPC API answers");
        let info = client
            .get_model_info(pb::GetModelInfoRequest {})
            .await
            .expect("GetModelInfo")
            .into_inner();
        assert!(info.backend.starts_with("cuda:0"), "{}", info.backend);
        blocks.push(info.kv_blocks);
        let ids = common::server::greedy_ids(&server.grpc, &case.prompt_ids, 4).await;
        assert_eq!(ids[..], case.greedy_ids[..4]);
    }
    // Twice the share, with the same tiny weights: nearly twice the blocks.
    assert!(
        blocks[1] as f64 > 1.8 * blocks[0] as f64,
        "KV blocks at 0.2 and 0.4: {blocks:?}"
    );
}

/// Whether the device is the CPU emulator, whose counters some tests read; prints why a test
/// is skipped when not (a real GPU has no such counters: use Nsight Systems there).
fn on_the_emulator(test: &str) -> bool {
    if !gpu_present(test) {
        return false;
    }
    let device = tessera_kernels::Backend::name(&CudaBackend::new(0).expect("device 0 opens"));
    let emulated = device.contains("Tessera CUDA emulator");
    if !emulated {
        eprintln!("SKIPPED: {test}: the counters come from the CPU emulator, not {device}");
    }
    emulated
}

/// The prompt of [`emulator_counters`]'s runs unless `extra` gives another.
const PROMPT: [&str; 2] = ["--prompt-ids", "1,2,3,4,5"];

/// The device counters of the CPU emulator (`tests/cuda-emulator`, which writes them to the file
/// `TESSERA_EMU_STATS` names when the process exits) for one `tessera generate --device cuda` of
/// `tokens` greedy tokens; `extra` flags for `tessera generate`, with [`PROMPT`] unless they
/// bring their own.
fn emulator_counters(
    model: &std::path::Path,
    tokens: usize,
    extra: &[&str],
) -> HashMap<String, f64> {
    let prompt: &[&str] = if extra.contains(&PROMPT[0]) {
        &[]
    } else {
        &PROMPT
    };
    let stats = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--device", "cuda", "--json", "--temperature", "0"])
        .args(prompt)
        .args(["--max-tokens", &tokens.to_string()])
        .args(extra)
        .env("TESSERA_EMU_STATS", stats.path())
        .output()
        .expect("tessera generate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["finish_reason"], "length", "{json}");
    std::fs::read_to_string(stats.path())
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// What one decode step asks of the device: the difference between generating 11 and 3 tokens,
/// over the 8 steps between them; `extra` flags for `tessera generate`.
fn per_decode_step(model: &std::path::Path, extra: &[&str]) -> HashMap<String, f64> {
    let (short, long) = (
        emulator_counters(model, 3, extra),
        emulator_counters(model, 11, extra),
    );
    long.iter()
        .map(|(k, v)| (k.clone(), (v - short.get(k).unwrap_or(&0.0)) / 8.0))
        .collect()
}

/// No host↔device copy, wait or memset hides inside a layer: a decode step of the qwen3_moe
/// fixture (4 layers, one of them MoE) and of the same checkpoint cut to 2 layers (the MoE one
/// kept) make the same copies — the step's inputs up, one row summary and the expert counts
/// down — and the same memsets, while the two extra layers add launches. The counts come from
/// the CPU emulator; a real GPU has no such counters (use Nsight Systems there), so the test
/// skips on one.
#[test]
fn a_decode_step_copies_the_same_whatever_the_layer_count() {
    let test = "a_decode_step_copies_the_same_whatever_the_layer_count";
    if !on_the_emulator(test) {
        return;
    }
    let four = common::fixtures_dir().join("qwen3_moe");
    let two = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&four).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "config.json" {
            std::os::unix::fs::symlink(&path, two.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(four.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 4);
    // Layer 1 is the MoE layer (decoder_sparse_step 2); layer 3 is dense by mlp_only_layers.
    config["num_hidden_layers"] = 2.into();
    config["mlp_only_layers"] = serde_json::json!([]);
    std::fs::write(two.path().join("config.json"), config.to_string()).unwrap();

    // Per process, not per step: the backend told the memory pool to keep freed memory.
    let opened = emulator_counters(&four, 3, &[]);
    assert_eq!(
        opened.get("mempool_keeps_freed_memory"),
        Some(&1.0),
        "{opened:?}"
    );
    let eager = per_decode_step(&four, &["--enforce-eager"]);
    let (four, two) = (
        per_decode_step(&four, &[]),
        per_decode_step(two.path(), &[]),
    );
    let get = |m: &HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let launches = |m: &HashMap<String, f64>| {
        m.iter()
            .filter(|(k, _)| k.starts_with("launch:"))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let mut keys: Vec<&String> = four.keys().chain(two.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        eprintln!(
            "per decode step: {k:<28} 4 layers {:>9.2}   2 layers {:>9.2}",
            get(&four, k),
            get(&two, k)
        );
    }
    for what in [
        "copy_to_device",
        "copy_to_host",
        "stream_synchronize",
        "memset",
    ] {
        assert_eq!(
            get(&four, what),
            get(&two, what),
            "{what} per decode step grows with layers"
        );
    }
    // Decode steps replay from a graph here. Up: the step's metadata, ids included, rewritten in
    // place (one copy). Down: one copy, the greedy row's summary and the step's expert counts
    // that the graph packed together (decode keeps every row: no gather).
    assert!(get(&four, "copy_to_device") <= 1.0, "{four:?}");
    assert_eq!(get(&four, "launch:gather_rows"), 0.0, "{four:?}");
    assert_eq!(get(&four, "launch:moe_count"), 1.0, "{four:?}");
    assert_eq!(get(&four, "copy_to_host"), 1.0, "{four:?}");
    // Run eagerly, the same: the step's metadata up; the summary and counts packed on the
    // device, down in one copy.
    assert_eq!(get(&eager, "graph_launch"), 0.0, "{eager:?}");
    assert_eq!(get(&eager, "copy_to_device"), 1.0, "{eager:?}");
    assert_eq!(get(&eager, "copy_to_host"), 1.0, "{eager:?}");
    assert!(
        launches(&four) > launches(&two) + 2.0 * 10.0,
        "{four:?} vs {two:?}"
    );
}

/// `--prefill-attention` and `--moe-kernels` reach the GPU backend: a 100-token prompt (tiles of
/// 64 and 36; 200 routed pairs over the one MoE layer's 8 experts, past the SIMT kernels' 16 per
/// expert) takes the tensor-core attention and MoE kernels by default, and the paged attention or
/// cuBLAS per expert when asked. The fixture tests above check the default's tokens against
/// transformers. Emulator only, as above.
#[test]
fn kernel_flags_pick_the_prompt_kernels() {
    let test = "kernel_flags_pick_the_prompt_kernels";
    if !on_the_emulator(test) {
        return;
    }
    let model = common::fixtures_dir().join("qwen3_moe");
    let ids: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
    let ids = ids.join(",");
    let launches = |flags: &[&str]| {
        let extra = [&["--prompt-ids", ids.as_str()][..], flags].concat();
        let c = emulator_counters(&model, 2, &extra);
        let n = |k: &str| c.get(&format!("launch:{k}")).copied().unwrap_or(0.0);
        [
            n("prefill_attention"),
            n("paged_attention"),
            n("moe_gate_up_mma"),
        ]
    };
    let layers = 4.0;
    // The prompt step's attention in every layer and its one MoE layer, then one decode step
    // with the paged attention kernel (and the SIMT MoE kernels).
    assert_eq!(launches(&[]), [layers, layers, 1.0]);
    assert_eq!(
        launches(&["--prefill-attention", "paged"]),
        [0.0, 2.0 * layers, 1.0]
    );
    assert_eq!(
        launches(&["--moe-kernels", "cublas"]),
        [layers, layers, 0.0]
    );
}

/// `tessera bench --roofline --device cuda` end to end on the tiny synthetic model: decode at two
/// batches with and without graphs, and one prompt prefilled with the default kernels, the paged
/// attention and cuBLAS per expert (80 tokens: 160 routed pairs over the tiny model's 8 experts
/// are past the SIMT kernels' 16 per expert, so the MoE switch changes the path). The
/// numbers are the report's business; that each is there and positive is this test's, so that a
/// GPU session's benchmark does not fail on something the emulator could have shown.
#[test]
fn the_gpu_roofline_reports_decode_and_the_prefill_comparison() {
    let test = "the_gpu_roofline_reports_decode_and_the_prefill_comparison";
    if !gpu_present(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("tiny");
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["bench", "--roofline", "--device", "cuda", "--json"])
        .args(["--model-size", "tiny", "--checkpoint-dir"])
        .arg(&ckpt)
        .args(["--batches", "1,2", "--tokens", "2", "--rounds", "1"])
        .args(["--prefill-compare-len", "80"])
        .output()
        .expect("tessera bench runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let positive = |x: &serde_json::Value, what: &str| {
        let f = x
            .as_f64()
            .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
        assert!(f > 0.0 && f.is_finite(), "{what} = {f}");
    };
    for batch in ["1", "2"] {
        positive(&v["decode_tok_s"][batch], &format!("decode_tok_s[{batch}]"));
    }
    positive(&v["batches"][0]["eager"]["tok_s"], "eager tok/s");
    let p = &v["prefill_compare"];
    assert_eq!(p["prompt_len"], 80, "{v}");
    let fields = [
        "tensor_cores_tok_s",
        "paged_attention_tok_s",
        "cublas_moe_tok_s",
        "attention_speedup",
        "moe_speedup",
    ];
    for field in fields {
        positive(&p[field], field);
    }
}
