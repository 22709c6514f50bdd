//! Unit tests for the checkpoint loader on tiny safetensors files written to a temp folder.
//! Malformed-file cases live in the root package's `tests/bad_checkpoints.rs`.

use std::path::Path;

use half::bf16;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use super::*;

/// A tensor to write: name, dtype, shape, little-endian bytes.
type Spec = (&'static str, Dtype, Vec<usize>, Vec<u8>);

fn f32s(shape: &[usize]) -> Vec<u8> {
    let n: usize = shape.iter().product();
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

fn bf16s(shape: &[usize]) -> Vec<u8> {
    let n: usize = shape.iter().product();
    (0..n)
        .flat_map(|i| bf16::from_f32(i as f32 * 0.5).to_bits().to_le_bytes())
        .collect()
}

fn write(dir: &Path, file: &str, specs: &[Spec]) {
    let views = specs.iter().map(|(name, dtype, shape, bytes)| {
        (
            *name,
            TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        )
    });
    std::fs::write(dir.join(file), safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A single-file checkpoint holding a [4, 3] f32, a [4, 3] bf16 and a [3] f32 tensor whose
/// element i is i (f32) or i/2 (bf16).
fn single() -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "model.safetensors",
        &[
            ("w.f32", Dtype::F32, vec![4, 3], f32s(&[4, 3])),
            ("w.bf16", Dtype::BF16, vec![4, 3], bf16s(&[4, 3])),
            ("bias", Dtype::F32, vec![3], f32s(&[3])),
        ],
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    (dir, ckpt)
}

#[test]
fn full_load_is_zero_copy() {
    let (_dir, ckpt) = single();
    for name in ["w.f32", "w.bf16"] {
        let t = ckpt.load(name, &[4, 3], Slice::Full).unwrap();
        assert!(t.is_shared(), "{name} was copied");
        assert_eq!(t.shape(), &[4, 3]);
    }
    let t = ckpt.load("w.f32", &[4, 3], Slice::Full).unwrap();
    assert_eq!(
        t.to_f32_vec(),
        (0..12).map(|i| i as f32).collect::<Vec<_>>()
    );
    assert_eq!(
        ckpt.load("w.bf16", &[4, 3], Slice::Full).unwrap().dtype(),
        DType::BF16
    );
}

#[test]
fn rows_and_cols_slices_f32() {
    let (_dir, ckpt) = single();
    let rows = ckpt.load("w.f32", &[4, 3], Slice::Rows(1..3)).unwrap();
    assert!(!rows.is_shared());
    assert_eq!(rows.shape(), &[2, 3]);
    assert_eq!(rows.to_f32_vec(), vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    let cols = ckpt.load("w.f32", &[4, 3], Slice::Cols(1..3)).unwrap();
    assert_eq!(cols.shape(), &[4, 2]);
    assert_eq!(
        cols.to_f32_vec(),
        vec![1.0, 2.0, 4.0, 5.0, 7.0, 8.0, 10.0, 11.0]
    );
    let bias = ckpt.load("bias", &[3], Slice::Rows(2..3)).unwrap();
    assert_eq!(bias.to_f32_vec(), vec![2.0]);
}

#[test]
fn rows_and_cols_slices_bf16() {
    let (_dir, ckpt) = single();
    let rows = ckpt.load("w.bf16", &[4, 3], Slice::Rows(3..4)).unwrap();
    assert_eq!(
        (rows.dtype(), rows.shape()),
        (DType::BF16, &[1usize, 3][..])
    );
    assert_eq!(rows.to_f32_vec(), vec![4.5, 5.0, 5.5]);
    let cols = ckpt.load("w.bf16", &[4, 3], Slice::Cols(0..1)).unwrap();
    assert_eq!(cols.shape(), &[4, 1]);
    assert_eq!(cols.to_f32_vec(), vec![0.0, 1.5, 3.0, 4.5]);
}

#[test]
fn bad_slices_are_errors() {
    let (_dir, ckpt) = single();
    for (name, shape, slice) in [
        ("w.f32", &[4usize, 3][..], Slice::Rows(3..5)),
        ("w.f32", &[4, 3], Slice::Cols(2..4)),
        ("w.f32", &[4, 3], Slice::Rows(2..2)),
        ("bias", &[3], Slice::Cols(0..1)),
    ] {
        let err = ckpt.load(name, shape, slice.clone()).unwrap_err();
        assert!(
            matches!(err, CheckpointError::BadSlice { .. }),
            "{slice:?}: {err}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn expected_shape_is_checked() {
    let (_dir, ckpt) = single();
    let err = ckpt.load("w.f32", &[3, 4], Slice::Rows(0..1)).unwrap_err();
    assert!(
        matches!(err, CheckpointError::ShapeMismatch { .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "tensor `w.f32` in model.safetensors has shape [4, 3], but config.json implies [3, 4]"
    );
}

#[test]
fn touched_records_loaded_names_only() {
    let (_dir, ckpt) = single();
    assert!(ckpt.touched().is_empty());
    ckpt.load("bias", &[3], Slice::Full).unwrap();
    ckpt.load("w.f32", &[4, 3], Slice::Cols(0..1)).unwrap();
    assert!(ckpt.load("w.bf16", &[9], Slice::Full).is_err());
    let touched: Vec<String> = ckpt.touched().into_iter().collect();
    assert_eq!(touched, ["bias", "w.f32"]);
}

#[test]
fn metadata_queries() {
    let (dir, ckpt) = single();
    assert_eq!(ckpt.dir(), dir.path());
    assert_eq!(ckpt.names(), ["bias", "w.bf16", "w.f32"]);
    assert!(ckpt.contains("bias") && !ckpt.contains("nope"));
    let info = ckpt.info("w.bf16").unwrap();
    assert_eq!((info.dtype, info.shape), (DType::BF16, vec![4, 3]));
    assert_eq!(info.file, dir.path().join("model.safetensors"));
    assert_eq!(ckpt.total_bytes(), 48 + 24 + 12);
}

#[test]
fn sharded_index_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let a = "model-00001-of-00002.safetensors";
    let b = "model-00002-of-00002.safetensors";
    write(
        dir.path(),
        a,
        &[
            ("x", Dtype::F32, vec![2], f32s(&[2])),
            ("dup", Dtype::F32, vec![1], f32s(&[1])),
        ],
    );
    write(
        dir.path(),
        b,
        &[
            ("y", Dtype::BF16, vec![2, 2], bf16s(&[2, 2])),
            ("dup", Dtype::F32, vec![2], f32s(&[2])),
        ],
    );
    // A stray single file must lose to the index.
    write(
        dir.path(),
        "model.safetensors",
        &[("stray", Dtype::F32, vec![1], f32s(&[1]))],
    );
    let index = format!(
        r#"{{"metadata":{{"total_size":1}},"weight_map":{{"x":"{a}","y":"{b}","dup":"{b}"}}}}"#
    );
    std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();

    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.names(), ["dup", "x", "y"]);
    assert_eq!(ckpt.info("x").unwrap().file, dir.path().join(a));
    assert_eq!(ckpt.info("y").unwrap().file, dir.path().join(b));
    // The index decides which copy of a tensor counts.
    assert_eq!(ckpt.info("dup").unwrap().shape, vec![2]);
    let y = ckpt.load("y", &[2, 2], Slice::Cols(1..2)).unwrap();
    assert_eq!(y.to_f32_vec(), vec![0.5, 1.5]);
    assert!(ckpt.load("x", &[2], Slice::Full).unwrap().is_shared());
    assert_eq!(ckpt.total_bytes(), 8 + 8 + 8);
}

#[test]
fn unnamed_files_are_opened_together() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.safetensors",
        &[("x", Dtype::F32, vec![1], f32s(&[1]))],
    );
    write(
        dir.path(),
        "b.safetensors",
        &[("y", Dtype::F16, vec![1], vec![0, 0x3c])],
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.names(), ["x", "y"]);
    assert_eq!(
        ckpt.load("y", &[1], Slice::Full).unwrap().to_f32_vec(),
        vec![1.0]
    );

    write(
        dir.path(),
        "c.safetensors",
        &[("x", Dtype::F32, vec![1], f32s(&[1]))],
    );
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::BadHeader { .. }), "{err}");
    assert!(
        err.to_string().contains("c.safetensors") && err.to_string().contains("`x`"),
        "{err}"
    );
}

#[test]
fn missing_tensor_suggests_similar_names() {
    let (_dir, ckpt) = single();
    let err = ckpt.load("w.f16", &[4, 3], Slice::Full).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CheckpointError::MissingTensor { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("`w.f16`") && msg.contains("3 tensors; similar: w.f32"),
        "{msg}"
    );
    let err = ckpt.info("zzz").unwrap_err();
    assert!(!err.to_string().contains("similar"), "{err}");
}
