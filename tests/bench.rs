//! `tessera bench --roofline`: driven as a tool would drive it, on the tiny synthetic model so it
//! runs in seconds. The numbers themselves are not asserted (speed is the report's business, not a
//! test's); their presence, types and signs are.

use std::process::Command;

use serde_json::Value;

fn tessera(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("tessera runs")
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
    x
}

#[test]
fn roofline_json_on_a_tiny_model_has_every_field() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tiny");
    let args = [
        "bench",
        "--roofline",
        "--json",
        "--model-size",
        "tiny",
        "--checkpoint-dir",
        dir.to_str().unwrap(),
        "--batches",
        "1,3",
        "--tokens",
        "3",
        "--warmup",
        "1",
        "--prompt-len",
        "5",
        "--rounds",
        "2",
        "--bandwidth-mib",
        "8",
        "--profile",
    ];
    let out = tessera(&args);
    assert!(
        out.status.success(),
        "tessera {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut values = serde_json::Deserializer::from_str(&stdout).into_iter::<Value>();
    let v = values.next().expect("one JSON object").expect("valid JSON");
    assert!(
        values.next().is_none(),
        "more than one JSON value: {stdout}"
    );

    positive(&v["bandwidth_gb_s"], "bandwidth_gb_s");
    let active = positive(&v["active_bytes_per_token"], "active_bytes_per_token");
    positive(&v["roofline_fraction_batch1"], "roofline_fraction_batch1");
    let rates = v["decode_tok_s"]
        .as_object()
        .expect("decode_tok_s is a map");
    assert_eq!(rates.keys().collect::<Vec<_>>(), ["1", "3"]);
    for (batch, rate) in rates {
        positive(rate, &format!("decode_tok_s[{batch}]"));
    }
    // The tiny shape: bf16 weights, 2 layers of 8 experts (top-2) on hidden 64, vocab 512.
    let (h, vocab, inter, heads, kv, d) = (64.0, 512.0, 32.0, 4.0, 2.0, 16.0);
    let per_layer = 2.0 * h + 2.0 * d + 2.0 * heads * d * h + 2.0 * kv * d * h + 8.0 * h;
    let want = 2.0 * (h + 2.0 * (per_layer + 2.0 * 3.0 * h * inter) + h + vocab * h);
    assert_eq!(active, want, "active bytes of the tiny model");
    assert_eq!(v["model"]["architecture"], "Qwen3MoeForCausalLM");
    assert_eq!(v["model"]["generated"], true);
    assert!(
        v["profile"]["ops"]
            .as_array()
            .is_some_and(|o| !o.is_empty())
    );
    // Two rounds: a probe before each and one after, a batch-1 fraction per round.
    assert_eq!(v["rounds"], 2);
    let probes = v["bandwidth_probes_gb_s"].as_array().expect("probes");
    assert_eq!(probes.len(), 3, "{probes:?}");
    let best = probes
        .iter()
        .map(|p| positive(p, "probe"))
        .fold(0.0, f64::max);
    assert_eq!(positive(&v["bandwidth_gb_s"], "bandwidth_gb_s"), best);
    let by_round = v["roofline_fraction_batch1_by_round"]
        .as_array()
        .expect("by round");
    assert_eq!(by_round.len(), 2);
    for b in v["batches"].as_array().expect("batches") {
        positive(&b["tok_s_mean"], "tok_s_mean");
        positive(&b["roofline_tok_s"], "roofline_tok_s");
        positive(&b["weight_bytes_per_step"], "weight_bytes_per_step");
    }

    // A second run reuses the cached checkpoint.
    let again = tessera(&args);
    assert!(again.status.success());
    let v: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["model"]["generated"], false);
}

#[test]
fn bench_without_a_mode_asks_for_a_server_or_the_roofline() {
    let out = tessera(&["bench"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--url") && err.contains("--roofline"), "{err}");
}

#[test]
fn a_checkpoint_dir_holding_something_else_is_refused() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("notes.txt"), "mine").unwrap();
    let out = tessera(&[
        "bench",
        "--roofline",
        "--model-size",
        "tiny",
        "--checkpoint-dir",
        root.path().to_str().unwrap(),
        "--bandwidth-mib",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not hold a synthetic checkpoint"),
        "{err}"
    );
    assert!(root.path().join("notes.txt").exists());
}
