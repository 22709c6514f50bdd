//! Routing and the MoE path of the CUDA backend against the CPU backend: softmax and grouped
//! sigmoid top-k, the grouped expert products over every dtype and row shape the kernels
//! specialise, and the per-expert token counts a graph collects. Skipped with a visible message
//! where no GPU (or emulator) is present, like `cuda.rs`.
#![cfg(feature = "cuda")]

mod common;

use common::{assert_close, gpu, ids_meta, rand_vec, rope_table, weight};
use tessera_kernels::cpu::CpuBackend;
use tessera_kernels::cuda::{CudaBackend, CudaRouting, CudaTensor, plan};
use tessera_kernels::{
    Backend, BackendError, DType, ExpertWeights, GroupScore, Result, RopeLayout, RouterParams,
    Scoring, StepShape,
};

fn route_params(scoring: Scoring, groups: Option<(usize, usize, GroupScore)>) -> RouterParams {
    RouterParams {
        num_experts: 16,
        top_k: 4,
        scoring,
        normalize: scoring == Scoring::Sigmoid,
        groups,
        scaling: if scoring == Scoring::Sigmoid {
            2.5
        } else {
            1.0
        },
    }
}

#[test]
fn routing_matches_cpu() {
    let Some(g) = gpu("routing_matches_cpu") else {
        return;
    };
    let cpu = CpuBackend;
    let t = 9;
    let logits = rand_vec(t * 16, 50)
        .iter()
        .map(|v| v * 4.0)
        .collect::<Vec<_>>();
    let bias = rand_vec(16, 51).iter().map(|v| v * 0.1).collect::<Vec<_>>();
    let cases = [
        route_params(Scoring::Softmax, None),
        route_params(Scoring::Sigmoid, Some((4, 2, GroupScore::SumTop2))),
        route_params(Scoring::Softmax, Some((4, 3, GroupScore::Max))),
    ];
    for (i, p) in cases.iter().enumerate() {
        let with_bias = p.scoring == Scoring::Sigmoid;
        let cl = cpu.tensor_from_host(logits.clone(), t, 16).unwrap();
        let cb = cpu
            .upload_weight(weight(bias.clone(), vec![16], DType::F32))
            .unwrap();
        let want = cpu.route(&cl, p, with_bias.then_some(&cb)).unwrap();
        let gl = g.tensor_from_host(logits.clone(), t, 16).unwrap();
        let gb = g
            .upload_weight(weight(bias.clone(), vec![16], DType::F32))
            .unwrap();
        let r = g.route(&gl, p, with_bias.then_some(&gb)).unwrap();
        let (ids, ws) = g.routing_to_host(&r).unwrap();
        assert_eq!(ids, want.experts, "case {i}: chosen experts");
        assert_close(&format!("route case {i}"), &ws, &want.weights, 1e-5);
        assert_eq!(
            g.expert_counts(&r, 16).unwrap(),
            cpu.expert_counts(&want, 16).unwrap()
        );
    }
}

/// One MoE layer: `tokens` tokens routed top-`top_k` over `experts` experts of `hidden` →
/// `inter` → `hidden`, every third expert (from expert 1) owned by another rank unless
/// `all_owned`.
#[derive(Clone, Copy, Debug)]
struct MoeShape {
    tokens: usize,
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
    dtype: DType,
    all_owned: bool,
}

impl MoeShape {
    fn new(tokens: usize, experts: usize, top_k: usize, hidden: usize, inter: usize) -> Self {
        MoeShape {
            tokens,
            experts,
            top_k,
            hidden,
            inter,
            dtype: DType::BF16,
            all_owned: false,
        }
    }

    fn dtype(self, dtype: DType) -> Self {
        MoeShape { dtype, ..self }
    }

    fn owned(&self, e: usize) -> bool {
        self.all_owned || e % 3 != 1
    }
}

/// A layer's weights on one backend: (gate, up, down) per owned expert. Values are scaled by
/// 1/sqrt(fan-in) so outputs stay near 1 whatever the sizes.
fn moe_weights<B: Backend>(b: &B, s: MoeShape) -> Result<Vec<Option<[B::Weight; 3]>>> {
    let (h, i) = (s.hidden, s.inter);
    let scaled = |n, seed, fan_in: usize| {
        let k = 1.0 / (fan_in as f32).sqrt();
        rand_vec(n, seed).into_iter().map(|v| v * k).collect()
    };
    (0..s.experts)
        .map(|e| {
            if !s.owned(e) {
                return Ok(None);
            }
            let seed = 1000 + 3 * e as u64;
            Ok(Some([
                b.upload_weight(weight(scaled(i * h, seed, h), vec![i, h], s.dtype))?,
                b.upload_weight(weight(scaled(i * h, seed + 1, h), vec![i, h], s.dtype))?,
                b.upload_weight(weight(scaled(h * i, seed + 2, i), vec![h, i], s.dtype))?,
            ]))
        })
        .collect()
}

fn as_experts<B: Backend>(w: &[Option<[B::Weight; 3]>]) -> Vec<Option<ExpertWeights<'_, B>>> {
    w.iter()
        .map(|e| {
            e.as_ref()
                .map(|[gate, up, down]| ExpertWeights { gate, up, down })
        })
        .collect()
}

/// Routes the shape's tokens and runs `run` (a backend's MoE entry point) over them.
fn moe_shape_case<B: Backend>(
    b: &B,
    s: MoeShape,
    run: impl Fn(&B, &B::Tensor, &B::Routing, &[Option<ExpertWeights<'_, B>>]) -> Result<B::Tensor>,
) -> Result<Vec<f32>> {
    let w = moe_weights(b, s)?;
    let p = RouterParams {
        num_experts: s.experts,
        top_k: s.top_k,
        scoring: Scoring::Softmax,
        normalize: true,
        groups: None,
        scaling: 1.0,
    };
    let logits = rand_vec(s.tokens * s.experts, 90 + s.tokens as u64)
        .iter()
        .map(|v| v * 3.0)
        .collect();
    let routing = b.route(&b.tensor_from_host(logits, s.tokens, s.experts)?, &p, None)?;
    let x = b.tensor_from_host(rand_vec(s.tokens * s.hidden, 91), s.tokens, s.hidden)?;
    b.tensor_to_host(&run(b, &x, &routing, &as_experts(&w))?)
}

/// One of the GPU's MoE entry points.
type GpuMoe = for<'w> fn(
    &CudaBackend,
    &CudaTensor,
    &CudaRouting,
    &[Option<ExpertWeights<'w, CudaBackend>>],
) -> Result<CudaTensor>;

/// Largest `hidden * inter` whose tensor-core run is checked: the emulator multiplies a warp's
/// tiles one lane at a time, so Mixtral-long rows would take minutes there. The small shapes
/// already cross several of the kernels' 32-wide chunks, a partial last one included.
const TENSOR_CORE_MAX_CELLS: usize = 1 << 16;

/// Runs every shape on the CPU and through the GPU's automatic choice, the grouped kernels, the
/// tensor-core grouped kernels and the per-expert cuBLAS path. The grouped kernels keep
/// activations in f32 like the CPU, so only the summation order differs; the tensor-core ones
/// round activations to tf32 (10 mantissa bits), and cuBLAS to a 16-bit weight's type.
fn check_moe_shapes(test: &str, shapes: &[MoeShape]) {
    let Some(g) = gpu(test) else { return };
    for &s in shapes {
        let want = moe_shape_case(&CpuBackend, s, |b, x, r, e| b.moe(x, r, e)).expect("cpu");
        let half_tol = match s.dtype {
            DType::F32 => 1e-3,
            DType::F16 => 5e-3,
            DType::BF16 => 3e-2,
        };
        let mut runs: Vec<(&str, f32, GpuMoe)> = vec![
            ("grouped", 1e-3, |b, x, r, e| b.moe_grouped(x, r, e)),
            ("per expert", half_tol, |b, x, r, e| {
                b.moe_per_expert(x, r, e)
            }),
            ("auto", half_tol, |b, x, r, e| b.moe(x, r, e)),
        ];
        if s.hidden * s.inter <= TENSOR_CORE_MAX_CELLS
            && plan::has_tf32_mma(g.info().compute_capability)
        {
            runs.push(("tensor cores", 4e-3, |b, x, r, e| {
                b.moe_tensor_cores(x, r, e)
            }));
        }
        for (name, tol, run) in runs {
            let got = moe_shape_case(&g, s, run).unwrap_or_else(|e| panic!("{name} {s:?}: {e}"));
            assert_close(&format!("{test} {name} {s:?}"), &got, &want, tol);
        }
    }
}

#[test]
fn moe_matches_cpu() {
    let mut shapes = Vec::new();
    for tokens in [1, 3, 64, 300] {
        for (experts, top_k) in [(8, 2), (8, 8), (64, 2), (64, 8), (128, 8)] {
            for dtype in [DType::BF16, DType::F32] {
                // 72 and 40 are multiples of neither kernel's features per block (16 and 32).
                shapes.push(MoeShape::new(tokens, experts, top_k, 72, 40).dtype(dtype));
            }
        }
    }
    shapes.push(MoeShape {
        all_owned: true,
        ..MoeShape::new(9, 8, 2, 72, 40)
    });
    check_moe_shapes("moe_matches_cpu", &shapes);
}

/// A step past the SIMT kernels' range (100 tokens, top-2 of 8 experts: 25 pairs per expert)
/// takes the tensor-core kernels, or with the backend's switch off cuBLAS per expert; both match
/// the CPU.
#[test]
fn large_steps_take_the_tensor_cores_unless_switched_off() {
    let test = "large_steps_take_the_tensor_cores_unless_switched_off";
    let Some(g) = gpu(test) else { return };
    if !plan::has_tf32_mma(g.info().compute_capability) {
        eprintln!("SKIPPED: {test}: the tensor-core kernels need compute capability 8.0");
        return;
    }
    let s = MoeShape::new(100, 8, 2, 72, 40);
    let want = moe_shape_case(&CpuBackend, s, |b, x, r, e| b.moe(x, r, e)).expect("cpu");
    let switch = g.tensor_core_moe();
    for (on, tol) in [(true, 4e-3), (false, 3e-2)] {
        switch.store(on, std::sync::atomic::Ordering::Relaxed);
        let before = g.kernel_launches("moe_gate_up_mma");
        let got = moe_shape_case(&g, s, |b, x, r, e| b.moe(x, r, e)).expect("gpu");
        let ran = g.kernel_launches("moe_gate_up_mma") - before;
        assert_eq!(
            ran,
            u64::from(on),
            "tensor-core launches with the switch {on}"
        );
        assert_close(&format!("{test} (switch {on})"), &got, &want, tol);
    }
}

#[test]
fn moe_rows_not_16_byte_aligned_take_the_scalar_path() {
    // 35 and 19 columns: neither 16-bit nor f32 rows are whole 16-byte vectors.
    let shapes: Vec<_> = [DType::BF16, DType::F16, DType::F32]
        .into_iter()
        .map(|d| MoeShape::new(5, 8, 2, 35, 19).dtype(d))
        .collect();
    check_moe_shapes("moe_scalar_path", &shapes);
}

#[test]
fn moe_with_long_rows_stages_several_chunks() {
    // Rows of 2056 and 5000 columns need 3 and 5 shared-memory chunks of 1024 (Mixtral's down
    // projection, 14336 columns, needs 14).
    let shapes = [
        MoeShape::new(3, 4, 2, 2056, 5000),
        MoeShape::new(32, 4, 2, 2056, 5000),
    ];
    check_moe_shapes("moe_long_rows", &shapes);
}

#[test]
fn moe_with_no_owned_expert_is_zero() {
    let Some(g) = gpu("moe_with_no_owned_expert_is_zero") else {
        return;
    };
    let s = MoeShape::new(4, 2, 1, 16, 8);
    // Every expert lives on another rank: the plan has no slot and the output is all zeros.
    let got = moe_shape_case(&g, s, |b, x, r, e| {
        let none: Vec<Option<ExpertWeights<'_, CudaBackend>>> = e.iter().map(|_| None).collect();
        b.moe(x, r, &none)
    })
    .unwrap();
    assert!(got.iter().all(|v| *v == 0.0), "{got:?}");
}

#[test]
fn moe_refuses_mixed_dtypes_and_too_many_experts() {
    let Some(g) = gpu("moe_refuses_mixed_dtypes_and_too_many_experts") else {
        return;
    };
    let (h, i) = (16, 8);
    let bf = |seed| weight(rand_vec(h * i, seed), vec![i, h], DType::BF16);
    let f = |seed| weight(rand_vec(h * i, seed), vec![i, h], DType::F32);
    let down = |dtype| weight(rand_vec(h * i, 5), vec![h, i], dtype);
    let w0 = [bf(1), bf(2), down(DType::BF16)].map(|t| g.upload_weight(t).unwrap());
    let w1 = [f(3), f(4), down(DType::F32)].map(|t| g.upload_weight(t).unwrap());
    let experts: Vec<_> = [&w0, &w1]
        .iter()
        .map(|[gate, up, down]| Some(ExpertWeights { gate, up, down }))
        .collect();
    let p = RouterParams {
        num_experts: 2,
        top_k: 1,
        scoring: Scoring::Softmax,
        normalize: false,
        groups: None,
        scaling: 1.0,
    };
    let x = g.tensor_from_host(rand_vec(2 * h, 6), 2, h).unwrap();
    let logits = g.tensor_from_host(rand_vec(4, 7), 2, 2).unwrap();
    let r = g.route(&logits, &p, None).unwrap();
    match g.moe(&x, &r, &experts) {
        Err(BackendError::Invalid { detail, .. }) => {
            assert!(
                detail.contains("expert 0") && detail.contains("expert 1"),
                "{detail}"
            )
        }
        other => panic!("expected Invalid, got {:?}", other.map(|_| ())),
    }
    // More experts than the device plan handles.
    let many = 1100;
    let p = RouterParams {
        num_experts: many,
        ..p
    };
    let logits = g.tensor_from_host(rand_vec(many, 8), 1, many).unwrap();
    let r = g.route(&logits, &p, None).unwrap();
    let x = g.tensor_from_host(rand_vec(h, 9), 1, h).unwrap();
    let mut experts: Vec<Option<ExpertWeights<'_, CudaBackend>>> =
        (0..many).map(|_| None).collect();
    experts[0] = Some(ExpertWeights {
        gate: &w0[0],
        up: &w0[1],
        down: &w0[2],
    });
    match g.moe(&x, &r, &experts) {
        Err(BackendError::Invalid { detail, .. }) => assert!(detail.contains("1100"), "{detail}"),
        other => panic!("expected Invalid, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn expert_counts_into_matches_cpu_and_skips_padding_rows() {
    let Some(g) = gpu("expert_counts_into_matches_cpu_and_skips_padding_rows") else {
        return;
    };
    let cpu = CpuBackend;
    let (e, rows, live) = (64, 20, 13);
    let p = RouterParams {
        num_experts: e,
        top_k: 8,
        scoring: Scoring::Softmax,
        normalize: true,
        groups: None,
        scaling: 1.0,
    };
    // 70 routings: more than one launch's table holds.
    let (mut all, mut lived, mut routings) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..70u64 {
        let logits = rand_vec(rows * e, 200 + i);
        let count = |t: usize| {
            let x = cpu
                .tensor_from_host(logits[..t * e].to_vec(), t, e)
                .unwrap();
            let r = cpu.route(&x, &p, None).unwrap();
            cpu.expert_counts(&r, e)
                .unwrap()
                .into_iter()
                .map(|c| c as f32)
                .collect::<Vec<_>>()
        };
        all.extend(count(rows));
        lived.extend(count(live));
        routings.push(
            g.route(&g.tensor_from_host(logits, rows, e).unwrap(), &p, None)
                .unwrap(),
        );
    }
    let refs: Vec<_> = routings.iter().collect();
    let rope = rope_table(RopeLayout::Half, 2, 1.0);
    let meta = ids_meta(&[1; 13]);
    let shape = StepShape {
        rows,
        table_width: 2,
        max_span: 16,
    };
    let shaped = g.prepare_step_shaped(&meta, &rope, shape).unwrap();
    let full = g.prepare_step(&ids_meta(&[1; 20]), &rope).unwrap();
    let mut counts = g.tensor_from_host(vec![7.0; 70 * e], 70, e).unwrap();
    let counter = g.launch_counter();
    let before = counter.load(std::sync::atomic::Ordering::Relaxed);
    g.expert_counts_into(&refs, &shaped, &mut counts).unwrap();
    let launches = counter.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert_eq!(launches, 2, "one count kernel per 64 routings");
    assert_eq!(g.tensor_to_host(&counts).unwrap(), lived);
    // Again over the unpadded step: every row counts, from zero.
    g.expert_counts_into(&refs, &full, &mut counts).unwrap();
    assert_eq!(g.tensor_to_host(&counts).unwrap(), all);
    assert_eq!(
        g.expert_counts(&routings[3], e).unwrap(),
        all[3 * e..4 * e]
            .iter()
            .map(|&c| c as u32)
            .collect::<Vec<_>>()
    );
    // Shapes that do not fit are errors.
    let mut wrong = g.tensor_from_host(vec![0.0; 69 * e], 69, e).unwrap();
    assert!(g.expert_counts_into(&refs, &full, &mut wrong).is_err());
    let other = g.prepare_step(&ids_meta(&[1; 5]), &rope).unwrap();
    assert!(g.expert_counts_into(&refs, &other, &mut counts).is_err());
}
