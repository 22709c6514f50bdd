//! The `tessera generate` contract, driven exactly as other tools drive it: a real process, flags,
//! one JSON object on stdout. Numbers are checked against transformers' references.

mod common;

use std::process::{Command, Output};

use serde_json::Value;

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("tessera runs")
}

/// Runs with `--json` and parses the single JSON object on stdout.
fn generate_json(args: &[&str]) -> Value {
    let mut all = vec!["generate", "--json"];
    all.extend_from_slice(args);
    let out = tessera(&all);
    assert!(
        out.status.success(),
        "tessera {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
    let mut values = serde_json::Deserializer::from_str(&stdout).into_iter::<Value>();
    let first = values.next().expect("one JSON object").expect("valid JSON");
    assert!(
        values.next().is_none(),
        "stdout holds more than one JSON value: {stdout}"
    );
    first
}

fn ids(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn json_output_matches_transformers_on_every_fixture() {
    for (name, dir) in common::fixtures() {
        let reference = common::reference(&dir);
        let tol = common::tolerance(&reference.dtype);
        let case = &reference.cases[0];
        let max = case.greedy_ids.len().to_string();
        let prompt = ids(&case.prompt_ids);
        let v = generate_json(&[
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &prompt,
            "--max-tokens",
            &max,
            "--temperature",
            "0",
            "--logprobs",
            "3",
            "--prompt-logprobs",
        ]);
        let got: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
        // Stopping at eos may legitimately end early; compare with transformers' eos-aware run.
        assert_eq!(got, case.greedy_until_eos, "{name}: tokens");
        let lps = floats(&v["logprobs"]);
        assert_eq!(lps.len(), got.len(), "{name}: one logprob per token");
        for (a, b) in lps.iter().zip(&case.greedy_logprobs) {
            assert!((a - b).abs() <= tol, "{name}: logprob {a} vs {b}");
        }
        let top = v["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), got.len(), "{name}");
        assert_eq!(
            top[0].as_array().unwrap().len(),
            3,
            "{name}: K alternatives"
        );
        assert_eq!(
            top[0][0][0].as_u64().unwrap() as u32,
            got[0],
            "{name}: best alternative is the greedy token"
        );
        let plp = v["prompt_logprobs"].as_array().unwrap();
        assert_eq!(plp.len(), case.prompt_ids.len(), "{name}");
        assert!(plp[0].is_null(), "{name}: first prompt logprob is null");
        for (a, b) in plp.iter().zip(&case.prompt_logprobs).skip(1) {
            let (a, b) = (a.as_f64().unwrap() as f32, b.unwrap());
            assert!((a - b).abs() <= tol, "{name}: prompt logprob {a} vs {b}");
        }
        let finish = v["finish_reason"].as_str().unwrap();
        let want = if case.greedy_until_eos.len() < case.greedy_ids.len() {
            "stop"
        } else {
            "length"
        };
        assert_eq!(finish, want, "{name}");
        assert_eq!(
            v.get("text").is_some(),
            dir.join("tokenizer.json").exists(),
            "{name}: text iff tokenizer"
        );
    }
}

#[test]
fn text_prompt_is_tokenized_and_decoded_like_transformers() {
    let dir = common::fixtures_dir().join("qwen3_moe");
    let reference = common::reference(&dir);
    let case = reference
        .cases
        .iter()
        .find(|c| c.prompt_text.is_some())
        .expect("a text case");
    let max = case.greedy_ids.len().to_string();
    let v = generate_json(&[
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        case.prompt_text.as_deref().unwrap(),
        "--max-tokens",
        &max,
        "--temperature",
        "0",
    ]);
    let got: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
    assert_eq!(got, case.greedy_until_eos);
    if got == case.greedy_ids {
        assert_eq!(v["text"].as_str(), case.greedy_text.as_deref());
    }
    assert!(
        v.get("top_logprobs").is_none() && v.get("prompt_logprobs").is_none(),
        "only when asked"
    );
}

#[test]
fn seeded_sampling_is_reproducible_and_streaming_prints_text() {
    let dir = common::fixtures_dir().join("qwen3_moe");
    let args = [
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "5,6,7",
        "--max-tokens",
        "12",
        "--temperature",
        "1.5",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "11",
    ];
    let a = generate_json(&args);
    let b = generate_json(&args);
    assert_eq!(a["token_ids"], b["token_ids"]);
    let mut stream_args = vec!["generate"];
    stream_args.extend_from_slice(&args);
    let out = tessera(&stream_args);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim_end_matches('\n'),
        a["text"].as_str().unwrap().trim_end_matches('\n')
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens/s"));
}

#[test]
fn bad_input_fails_with_a_named_error() {
    let llama = common::fixtures_dir().join("llama");
    let llama = llama.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "generate",
                "--model",
                "/nonexistent/model",
                "--prompt-ids",
                "1",
            ],
            "config.json",
        ),
        (
            &["generate", "--model", llama, "--prompt-ids", "1,999999"],
            "999999",
        ),
        (
            &["generate", "--model", llama, "--prompt", "hello"],
            "tokenizer.json",
        ),
        (
            &[
                "generate",
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--temperature",
                "-1",
            ],
            "temperature",
        ),
        (
            &[
                "generate",
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--top-p",
                "0",
            ],
            "top_p",
        ),
        (
            &[
                "generate",
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--max-tokens",
                "0",
            ],
            "max_tokens",
        ),
        (
            &[
                "generate",
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--max-tokens",
                "100000",
            ],
            "context",
        ),
        (
            &["generate", "--model", llama, "--prompt-ids", "1,x"],
            "prompt-ids",
        ),
        (&["generate", "--model", llama], "--prompt"),
    ];
    for (args, needle) in cases {
        let out = tessera(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr lacks `{needle}`: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} wrote to stdout");
    }
}

#[test]
fn help_explains_every_flag() {
    let out = tessera(&["generate", "--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--model",
        "--prompt",
        "--prompt-ids",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--logprobs",
        "--prompt-logprobs",
        "--json",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn embedded_cluster_of_worker_processes_matches_one_process() {
    // Fixtures whose heads split over 2 and 3 ranks; --tp N starts N `tessera worker` processes.
    for (name, world) in [
        ("deepseek_v3", "2"),
        ("qwen2_moe", "2"),
        ("mixtral", "2"),
        ("qwen3_moe", "2"),
        ("kimi_k2_style", "2"),
    ] {
        let dir = common::fixtures_dir().join(name);
        let reference = common::reference(&dir);
        let case = &reference.cases[1];
        let (prompt, max) = (ids(&case.prompt_ids), case.greedy_ids.len().to_string());
        let args = [
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &prompt,
            "--max-tokens",
            &max,
            "--temperature",
            "0",
            "--prompt-logprobs",
        ];
        let one = generate_json(&args);
        let mut tp_args = args.to_vec();
        tp_args.extend(["--tp", world]);
        let many = generate_json(&tp_args);
        assert_eq!(many["token_ids"], one["token_ids"], "{name} --tp {world}");
        for (key, skip) in [("logprobs", 0), ("prompt_logprobs", 1)] {
            for (a, b) in floats_opt(&many[key])
                .iter()
                .zip(floats_opt(&one[key]))
                .skip(skip)
            {
                assert!(
                    (a.unwrap() - b.unwrap()).abs() <= 1e-4,
                    "{name} --tp {world} {key}: {a:?} vs {b:?}"
                );
            }
        }
    }
}

#[test]
fn a_plan_that_cannot_split_fails_clearly() {
    // qwen3_moe has 4 query heads: 3 ranks cannot split them.
    let dir = common::fixtures_dir().join("qwen3_moe");
    let out = tessera(&[
        "generate",
        "--json",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--tp",
        "3",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("heads") && stderr.contains("3 ranks"),
        "{stderr}"
    );
}

fn floats_opt(v: &Value) -> Vec<Option<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect()
}

#[test]
fn placement_command_prints_contiguous_blocks() {
    let dir = common::fixtures_dir().join("deepseek_v3");
    let out = tessera(&["placement", "--model", dir.to_str().unwrap(), "--tp", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(map["world_size"], 4);
    // deepseek_v3: layer 0 dense, layers 1-2 MoE with 8 experts → 2 per rank.
    assert_eq!(map["layers"][0]["layer"], 1);
    assert_eq!(
        map["layers"][0]["ranks"],
        serde_json::json!([0, 0, 1, 1, 2, 2, 3, 3])
    );
}

/// A worker that registers in etcd while bound to every interface would record an address nobody
/// can dial: it refuses to start (before announcing itself or contacting etcd) and names the flag.
#[test]
fn an_etcd_worker_on_a_wildcard_address_needs_advertise_ip() {
    let out = tessera(&[
        "worker",
        "--listen",
        "0.0.0.0:0",
        "--etcd",
        "http://127.0.0.1:9",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--advertise-ip"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("TESSERA_WORKER_READY"), "{stdout}");
}

/// `--device`: `cpu` runs, an unknown name is refused by the parser with the accepted ones, and
/// `cuda` where no GPU can be used (this machine, or a build without the feature) fails with the
/// reason, never a panic. On a GPU machine only the first two are checked (tests/gpu.rs covers
/// the rest).
#[test]
fn device_flag_is_checked_and_a_missing_gpu_is_a_clear_error() {
    let dir = common::fixtures_dir().join("llama");
    let model = dir.to_str().unwrap();
    let greedy = [
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
    ];
    let v = generate_json(&[&["--model", model][..], &greedy].concat());
    assert_eq!(v["token_ids"].as_array().map(Vec::len), Some(2));
    let cpu = generate_json(&[&["--model", model, "--device", "cpu"][..], &greedy].concat());
    assert_eq!(cpu["token_ids"], v["token_ids"]);
    let bad = tessera(&["generate", "--model", model, "--device", "gpu"]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    if tessera_kernels::cuda::CudaBackend::device_count().is_ok_and(|n| n > 0) {
        return;
    }
    let one = ["generate", "--model", model, "--prompt-ids", "1"];
    for args in [
        [&one[..], &["--device", "cuda"]].concat(),
        [&one[..], &["--device", "cuda:1", "--tp", "2"]].concat(),
        [
            "bench",
            "--roofline",
            "--device",
            "cuda",
            "--model-size",
            "tiny",
        ]
        .to_vec(),
    ] {
        let out = tessera(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded without a GPU");
        assert!(
            err.contains("CUDA not available") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
