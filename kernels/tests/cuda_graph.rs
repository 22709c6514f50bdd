//! CUDA graphs (`CudaBackend::capture` / `replay`): a captured sequence of operations replays
//! with the inputs of each launch, and what a graph cannot hold fails the capture instead of
//! replaying wrong. Skipped with a visible message where no GPU (or emulator) is present; CI
//! runs it on the CPU emulator of the driver, whose graphs refill graph-owned memory with 0xff
//! bytes before every launch.
#![cfg(feature = "cuda")]

mod common;

use common::{assert_close, gpu, rand_vec, weight};
use tessera_kernels::cpu::CpuBackend;
use tessera_kernels::{
    AttentionParams, Backend, DType, KvSpec, KvValues, Result, RopeLayout, RopeTable, SeqMeta,
    StepMeta, StepShape,
};

/// The captured body, run eagerly on any backend: an RMSNorm, a bf16 product, SiLU×mul.
fn body<B: Backend>(b: &B, x: &B::Tensor, w: &(B::Weight, B::Weight)) -> Result<B::Tensor> {
    let h = b.rms_norm(x, &w.0, 1e-6)?;
    let y = b.linear(&h, &w.1, None)?;
    b.silu_mul(&y, &h)
}

fn weights<B: Backend>(b: &B) -> Result<(B::Weight, B::Weight)> {
    Ok((
        b.upload_weight(weight(rand_vec(32, 1), vec![32], DType::F32))?,
        b.upload_weight(weight(rand_vec(32 * 32, 2), vec![32, 32], DType::BF16))?,
    ))
}

#[test]
fn a_captured_graph_replays_with_each_launchs_inputs() {
    let Some(g) = gpu("a_captured_graph_replays_with_each_launchs_inputs") else {
        return;
    };
    let (rows, cols) = (3, 32);
    let gw = weights(&g).unwrap();
    let mut input = g
        .tensor_from_host(vec![0.0; rows * cols], rows, cols)
        .unwrap();
    let mut output = g
        .tensor_from_host(vec![0.0; rows * cols], rows, cols)
        .unwrap();
    let counter = g.launch_counter();
    let launches = || counter.load(std::sync::atomic::Ordering::Relaxed);
    let graph = g
        .capture(|| {
            let y = body(&g, &input, &gw)?;
            g.copy_into(&mut output, &y)
        })
        .unwrap();
    let cw = weights(&CpuBackend).unwrap();
    for seed in [10, 11, 12] {
        let x = rand_vec(rows * cols, seed);
        g.write_into(&mut input, &x).unwrap();
        let before = launches();
        g.replay(&graph).unwrap();
        assert_eq!(launches() - before, 1, "a replay is one launch");
        let got = g.tensor_to_host(&output).unwrap();
        let cx = CpuBackend.tensor_from_host(x, rows, cols).unwrap();
        let want = CpuBackend
            .tensor_to_host(&body(&CpuBackend, &cx, &cw).unwrap())
            .unwrap();
        assert_close(&format!("replay with inputs {seed}"), &got, &want, 2e-2);
    }
    // The backend works eagerly as before.
    let eager = body(&g, &input, &gw).unwrap();
    assert_close(
        "eager after replays",
        &g.tensor_to_host(&eager).unwrap(),
        &g.tensor_to_host(&output).unwrap(),
        0.0,
    );
}

#[test]
fn what_a_graph_cannot_hold_fails_the_capture() {
    let Some(g) = gpu("what_a_graph_cannot_hold_fails_the_capture") else {
        return;
    };
    // An upload from the host (per-step metadata must be written before the launch instead).
    let err = g
        .capture(|| g.tensor_from_host(vec![1.0; 8], 2, 4).map(drop))
        .err()
        .expect("an upload inside a capture");
    assert!(err.to_string().contains("tensor_from_host"), "{err}");
    // A copy to the host.
    let x = g.tensor_from_host(rand_vec(8, 3), 2, 4).unwrap();
    assert!(g.capture(|| g.tensor_to_host(&x).map(drop)).is_err());
    // Freeing a tensor made before the capture: every launch would free it again.
    let doomed = g.tensor_from_host(rand_vec(8, 4), 2, 4).unwrap();
    assert!(
        g.capture(move || {
            drop(doomed);
            Ok(())
        })
        .is_err()
    );
    // The body's own error comes back as it was.
    let err = g
        .capture(|| g.narrow_cols(&x, 3, 5).map(drop))
        .err()
        .expect("narrowing past the columns");
    assert!(err.to_string().contains("narrow_cols"), "{err}");
    // A panic inside the capture (a bug in the caller) does not leave the stream capturing.
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = g.capture(|| panic!("inside a capture"));
    }));
    assert!(panicked.is_err());
    // After all that the stream is out of capture mode and works.
    let y = g.narrow_cols(&x, 1, 2).unwrap();
    assert_eq!(g.tensor_to_host(&y).unwrap().len(), 4);
    let mut out = g.tensor_from_host(vec![0.0; 4], 2, 2).unwrap();
    let graph = g.capture(|| g.copy_into(&mut out, &y)).unwrap();
    g.replay(&graph).unwrap();
    assert_eq!(
        g.tensor_to_host(&out).unwrap(),
        g.tensor_to_host(&y).unwrap()
    );
}

/// One decode token of a sequence in blocks `blocks` with `context` positions, token `id`.
fn decode_meta(context: usize, blocks: Vec<u32>, id: u32) -> StepMeta {
    StepMeta {
        seqs: vec![SeqMeta {
            token_start: 0,
            num_tokens: 1,
            context_len: context,
            block_table: blocks,
        }],
        block_size: 4,
        tokens: vec![id],
    }
}

#[test]
fn a_shaped_step_pads_rows_that_write_nothing_and_is_rewritten_in_place() {
    let Some(g) = gpu("a_shaped_step_pads_rows_that_write_nothing_and_is_rewritten_in_place")
    else {
        return;
    };
    let rope = RopeTable {
        inv_freq: vec![1.0, 0.1],
        attention_scaling: 1.0,
        layout: RopeLayout::Half,
    };
    let spec = KvSpec {
        num_blocks: 4,
        block_size: 4,
        num_kv_heads: 1,
        k_dim: 4,
        v_dim: 4,
        values: KvValues::Separate,
    };
    let mut cache = g.alloc_kv(spec).unwrap();
    let shape = StepShape {
        rows: 4,
        table_width: 2,
        max_span: 8,
    };
    let mut step = g
        .prepare_step_shaped(&decode_meta(6, vec![2, 3], 7), &rope, shape)
        .unwrap();
    // Four rows, three of them padding: only the live row is written (block 3, slot 1); the
    // padding rows' sentinel slot is skipped, not written out of bounds.
    let k = g.tensor_from_host(vec![1.0; 16], 4, 4).unwrap();
    let v = g.tensor_from_host(vec![2.0; 16], 4, 4).unwrap();
    g.write_kv(&mut cache, &k, Some(&v), &step).unwrap();
    // Block 0, where the padding rows read, is still zero: a query there sees a zero value.
    let read0 = g.prepare_step(&decode_meta(1, vec![0], 0), &rope).unwrap();
    let q = g.tensor_from_host(vec![1.0; 4], 1, 4).unwrap();
    let params = AttentionParams {
        num_heads: 1,
        num_kv_heads: 1,
        qk_dim: 4,
        v_dim: 4,
        scale: 0.5,
        sliding_window: None,
    };
    let out = g.attention(&q, &cache, &read0, &params).unwrap();
    assert_eq!(g.tensor_to_host(&out).unwrap(), vec![0.0; 4]);
    // Rewritten in place: the embedding reads the new id in the live row, id 0 in the padding.
    let table = weight(rand_vec(10 * 3, 5), vec![10, 3], DType::F32);
    let rows = table.to_f32_vec();
    let table = g.upload_weight(table).unwrap();
    g.update_step(&mut step, &decode_meta(7, vec![2, 3], 9), &rope)
        .unwrap();
    let x = g
        .tensor_to_host(&g.embedding(&table, &step).unwrap())
        .unwrap();
    let want: Vec<f32> = [9, 0, 0, 0]
        .iter()
        .flat_map(|&id| rows[id * 3..id * 3 + 3].to_vec())
        .collect();
    assert_eq!(x, want);
    // What does not fit the shape, or the cache the step was checked against, is refused.
    let mut err = |m: StepMeta| {
        let mut s = g
            .prepare_step_shaped(&decode_meta(6, vec![2, 3], 7), &rope, shape)
            .unwrap();
        g.write_kv(&mut cache, &k, Some(&v), &s).unwrap();
        g.update_step(&mut s, &m, &rope).unwrap_err().to_string()
    };
    assert!(err(decode_meta(9, vec![1, 2, 3], 1)).contains("9 positions"));
    assert!(err(decode_meta(6, vec![2, 5], 1)).contains("block 5"));
    let mut plain = g
        .prepare_step(&decode_meta(6, vec![2, 3], 7), &rope)
        .unwrap();
    assert!(
        g.update_step(&mut plain, &decode_meta(6, vec![2, 3], 7), &rope)
            .is_err()
    );
}

/// `memory_use` follows the stream-ordered pool and graph memory: the pool keeps what is freed
/// (the backend sets its release threshold so) until `trim_memory` hands it back, and a capture's
/// allocations are graph memory for as long as the graph lives. The profile that sizes the KV
/// cache (`tessera_worker::profile`) reads exactly these numbers.
#[test]
fn memory_use_follows_the_pool_and_graph_memory() {
    let Some(g) = gpu("memory_use_follows_the_pool_and_graph_memory") else {
        return;
    };
    let Some(start) = g.memory_use().unwrap() else {
        eprintln!("SKIPPED: memory_use_follows_the_pool_and_graph_memory: no memory pools");
        return;
    };
    g.trim_memory().unwrap();
    let start = g.memory_use().unwrap().unwrap_or(start);
    let (rows, cols) = (64, 1024);
    let bytes = (rows * cols * 4) as u64;
    let t = g
        .tensor_from_host(vec![1.0; rows * cols], rows, cols)
        .unwrap();
    let held = g.memory_use().unwrap().unwrap();
    assert!(held.pool >= start.pool + bytes, "{start:?} then {held:?}");
    drop(t);
    g.synchronize().unwrap();
    let freed = g.memory_use().unwrap().unwrap();
    assert!(
        freed.pool >= start.pool + bytes,
        "the pool keeps freed memory: {freed:?}"
    );
    assert!(freed.pool_peak >= start.pool + bytes, "{freed:?}");
    g.trim_memory().unwrap();
    let trimmed = g.memory_use().unwrap().unwrap();
    assert!(
        trimmed.pool < start.pool + bytes,
        "a trim hands it back: {trimmed:?}"
    );
    assert_eq!(
        trimmed.pool_peak, trimmed.pool,
        "a trim restarts the high-water mark"
    );

    let gw = weights(&g).unwrap();
    let input = g.tensor_from_host(vec![0.5; rows * 32], rows, 32).unwrap();
    let mut output = g.tensor_from_host(vec![0.0; rows * 32], rows, 32).unwrap();
    let before = g.memory_use().unwrap().unwrap();
    let graph = g
        .capture(|| {
            let y = body(&g, &input, &gw)?;
            g.copy_into(&mut output, &y)
        })
        .unwrap();
    g.replay(&graph).unwrap();
    g.synchronize().unwrap();
    let captured = g.memory_use().unwrap().unwrap();
    // The body's intermediates (norm, product, SiLU×mul) are graph memory, not the pool's.
    let intermediates = (rows * 32 * 4) as u64;
    assert!(
        captured.graphs_peak >= before.graphs + intermediates,
        "{before:?} then {captured:?}"
    );
    assert_eq!(captured.pool_peak, before.pool_peak, "{captured:?}");
    drop(graph);
    g.trim_memory().unwrap();
    let after = g.memory_use().unwrap().unwrap();
    assert_eq!(
        after.graphs, before.graphs,
        "a dropped graph's memory goes back: {after:?}"
    );
}
