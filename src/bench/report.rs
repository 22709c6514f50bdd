//! The roofline report as a readable table (the `--json` form is the serialised [`Roofline`]).

use std::fmt::Write;

use super::gpu::GpuRoofline;
use super::roofline::Roofline;

fn gb(bytes: f64) -> String {
    format!("{:.3} GB", bytes / 1e9)
}

pub fn table(r: &Roofline) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Roofline report (commit {})",
        r.commit.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        s,
        "machine   {} | {} threads of {} logical CPUs | kernels {} | load avg {} → {}",
        m.cpu,
        m.threads,
        m.logical_cpus,
        m.kernels,
        m.load_average[0].map_or("?".into(), |v| format!("{v:.2}")),
        m.load_average[1].map_or("?".into(), |v| format!("{v:.2}")),
    );
    let md = &r.model;
    let _ = writeln!(
        s,
        "model     {} | {} layers, hidden {}, vocab {}{} | {} of {} | {}{}",
        md.architecture,
        md.layers,
        md.hidden_size,
        md.vocab_size,
        match (md.experts, md.top_k) {
            (Some(e), Some(k)) => format!(", {e} experts top-{k}"),
            _ => String::new(),
        },
        gb(md.total_weight_bytes as f64),
        md.weight_dtypes.join("/"),
        md.dir.display(),
        if md.generated { " (generated now)" } else { "" },
    );
    let (b0, b1) = (&r.bandwidth_before, &r.bandwidth_after);
    let _ = writeln!(
        s,
        "bandwidth read {:.1} GB/s (read with 1/4/8 streams per thread, copy: before {:.1}/{:.1}/{:.1}, {:.1}; after {:.1}/{:.1}/{:.1}, {:.1})",
        r.bandwidth_gb_s,
        b0.read_1stream_gb_s,
        b0.read_4stream_gb_s,
        b0.read_8stream_gb_s,
        b0.copy_gb_s,
        b1.read_1stream_gb_s,
        b1.read_4stream_gb_s,
        b1.read_8stream_gb_s,
        b1.copy_gb_s,
    );
    let probes: Vec<String> = r
        .bandwidth_probes_gb_s
        .iter()
        .map(|g| format!("{g:.1}"))
        .collect();
    let _ = writeln!(
        s,
        "          every probe's best read GB/s: {}",
        probes.join(", ")
    );
    let _ = writeln!(
        s,
        "compute   FMA peak {} | {:.0} M multiply-adds per token",
        r.fma_peak_gflops
            .map_or("not measured".into(), |p| format!("{p:.0} GFLOP/s")),
        r.macs_per_token as f64 / 1e6,
    );
    let _ = writeln!(
        s,
        "active weights per token {} → batch-1 roofline {:.1} tok/s",
        gb(r.active_bytes_per_token as f64),
        r.roofline_tok_s_batch1
    );
    let _ = writeln!(
        s,
        "\n{:>5} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9} {:>7} {:>7} {:>7} {:>9}",
        "batch",
        "tok/s",
        "mean",
        "step ms",
        "min ms",
        "bytes/step",
        "mem roof",
        "cpu roof",
        "of roof",
        "vs b1",
        "ceiling",
        "prefill/s"
    );
    let x = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}x"));
    for b in &r.batches {
        let _ = writeln!(
            s,
            "{:>5} {:>8.1} {:>8.1} {:>8.2} {:>8.2} {:>10} {:>9.1} {:>9} {:>6.1}% {:>7} {:>7} {:>9.1}",
            b.timing.batch,
            b.timing.tok_s,
            b.timing.tok_s_mean,
            b.timing.step_ms_median,
            b.timing.step_ms_min,
            gb(b.timing.weight_bytes_per_step),
            b.memory_roof_tok_s,
            b.compute_roof_tok_s
                .map_or("-".into(), |c| format!("{c:.1}")),
            100.0 * b.roofline_fraction,
            x(b.speedup_vs_batch1),
            x(b.speedup_ceiling_vs_batch1),
            b.timing.prefill_tok_s,
        );
    }
    let _ = writeln!(
        s,
        "(tok/s from the median step, \"mean\" from the total time; roofs in tok/s; \"of roof\" is against the lower roof; \"ceiling\" is this batch's roof over batch 1's)"
    );
    if let Some(f) = r.roofline_fraction_batch1 {
        let _ = writeln!(
            s,
            "\nbatch-1 decode: {:.1}% of the bandwidth roofline ({} prompt tokens{}, {} rounds of {} timed steps; by round: {})",
            100.0 * f,
            r.prompt_len,
            mla_note(r.mla_prefill),
            r.rounds,
            r.timed_steps,
            r.roofline_fraction_batch1_by_round
                .iter()
                .map(|f| format!("{:.1}%", 100.0 * f))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(p) = &r.profile {
        let _ = writeln!(
            s,
            "\nprofile at batch {}: {:.2} ms/step, {:.3} ms outside backend ops, empty parallel region {:.1} µs",
            p.batch, p.step_ms, p.outside_ops_ms, p.fork_join_us
        );
        let _ = writeln!(s, "{:>8} {:>8} {:>7}  op", "ms/step", "calls", "share");
        for op in &p.ops {
            let _ = writeln!(
                s,
                "{:>8.3} {:>8.1} {:>6.1}%  {}",
                op.ms_per_step,
                op.calls_per_step,
                100.0 * op.share,
                op.op
            );
        }
    }
    s
}

/// The GPU roofline as a table (the `--json` form is the serialised [`GpuRoofline`]).
pub fn gpu_table(r: &GpuRoofline) -> String {
    let mut s = String::new();
    let g = &r.gpu;
    let _ = writeln!(
        s,
        "GPU roofline report (commit {})",
        r.commit.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        s,
        "gpu       {} | {:.1} GiB | peak {} | device copy {:.0} / {:.0} GB/s (before / after)",
        g.name,
        g.memory_total_gib,
        g.peak_bandwidth_gb_s
            .map_or("not reported".into(), |p| format!("{p:.0} GB/s")),
        g.copy_bandwidth_gb_s[0],
        g.copy_bandwidth_gb_s[1],
    );
    let md = &r.model;
    let _ = writeln!(
        s,
        "model     {} | {} layers, hidden {}{} | {} | loaded in {:.1}s | {}",
        md.architecture,
        md.layers,
        md.hidden_size,
        match (md.experts, md.top_k) {
            (Some(e), Some(k)) => format!(", {e} experts top-{k}"),
            _ => String::new(),
        },
        gb(md.total_weight_bytes as f64),
        md.load_seconds,
        md.dir.display(),
    );
    let _ = writeln!(
        s,
        "per token {} of active weights; batch-1 roof {}",
        gb(r.active_bytes_per_token as f64),
        r.roofline_tok_s_batch1
            .map_or("unknown".into(), |t| format!("{t:.0} tok/s")),
    );
    let _ = writeln!(
        s,
        "{:>6} {:>10} {:>10} {:>11} {:>12} {:>10} {:>9} {:>9} {:>9} {:>11} {:>8}",
        "batch",
        "tok/s",
        "step ms",
        "prefill t/s",
        "GB per step",
        "GB/s",
        "of peak",
        "of copy",
        "launches",
        "eager tok/s",
        "graphs×"
    );
    for b in &r.batches {
        let (eager, speedup) = match &b.eager {
            Some(e) => (format!("{:.1}", e.tok_s), format!("{:.2}", e.graph_speedup)),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "{:>6} {:>10.1} {:>10.3} {:>11.0} {:>12.3} {:>10.0} {:>9} {:>8.1}% {:>9} {:>11} {:>8}",
            b.timing.batch,
            b.timing.tok_s,
            b.timing.step_ms_median,
            b.timing.prefill_tok_s,
            b.timing.weight_bytes_per_step / 1e9,
            b.weight_gb_s,
            b.hbm_fraction
                .map_or("?".into(), |f| format!("{:.1}%", f * 100.0)),
            b.copy_fraction * 100.0,
            b.launches_per_step,
            eager,
            speedup,
        );
    }
    let _ = writeln!(
        s,
        "{} timed steps per batch and round, {} rounds, prompt {} tokens{}, {} KV blocks",
        r.timed_steps,
        r.rounds,
        r.prompt_len,
        mla_note(r.mla_prefill),
        r.kv_blocks
    );
    let g = &r.graphs;
    let _ = writeln!(
        s,
        "decode graphs: {} captured, {} steps replayed, {} captures refused",
        g.captures, g.replays, g.refused
    );
    if let Some(p) = &r.prefill_compare {
        let _ = writeln!(
            s,
            "prefill of {} tokens: {:.0} tok/s on tensor cores; {:.0} with paged attention \
             ({:.2}x), {:.0} with cuBLAS per expert ({:.2}x)",
            p.prompt_len,
            p.tensor_cores_tok_s,
            p.paged_attention_tok_s,
            p.attention_speedup,
            p.cublas_moe_tok_s,
            p.moe_speedup
        );
    }
    s
}

/// A forced MLA form, named beside the prompt length (nothing for the default).
fn mla_note(m: super::MlaPrefillArg) -> String {
    match m {
        super::MlaPrefillArg::Auto => String::new(),
        forced => format!(", MLA forced {}", format!("{forced:?}").to_lowercase()),
    }
}
