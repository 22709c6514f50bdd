//! CUDA graphs (`CudaBackend::capture` / `replay`): a captured sequence of operations replays
//! with the inputs of each launch, and what a graph cannot hold fails the capture instead of
//! replaying wrong. Skipped with a visible message where no GPU (or emulator) is present; CI
//! runs it on the CPU emulator of the driver, whose graphs refill graph-owned memory with 0xff
//! bytes before every launch.
#![cfg(feature = "cuda")]

mod common;

use common::{assert_close, gpu, rand_vec, weight};
use tessera_kernels::cpu::CpuBackend;
use tessera_kernels::{Backend, DType, Result};

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
