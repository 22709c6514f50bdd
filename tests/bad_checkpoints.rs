//! Broken checkpoint folders must fail with an error that names what is wrong: the file, the
//! tensor, or both. One test per `CheckpointError` kind, each on a tiny folder written here.

use std::path::Path;

use anyhow::{Result, bail, ensure};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use tempfile::TempDir;
use tessera_worker::checkpoint::*;

const Q_PROJ: &str = "model.layers.0.self_attn.q_proj.weight";
const NORM: &str = "model.layers.0.input_layernorm.weight";
const INDEX: &str = "model.safetensors.index.json";

/// Safetensors bytes holding zero-filled tensors.
fn safetensors_bytes(tensors: &[(&str, Dtype, &[usize])]) -> Result<Vec<u8>> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dtype, shape)| vec![0u8; shape.iter().product::<usize>() * dtype.bitsize() / 8])
        .collect();
    let mut views = Vec::new();
    for ((name, dtype, shape), bytes) in tensors.iter().zip(&data) {
        views.push((*name, TensorView::new(*dtype, shape.to_vec(), bytes)?));
    }
    Ok(safetensors::serialize(views, None)?)
}

/// A temp folder holding the given files.
fn folder(files: &[(&str, Vec<u8>)]) -> Result<TempDir> {
    let dir = tempfile::tempdir()?;
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes)?;
    }
    Ok(dir)
}

/// A folder with a valid `model.safetensors`: a [64, 32] f32 q_proj and a [32] bf16 norm.
fn model() -> Result<TempDir> {
    let bytes = safetensors_bytes(&[(Q_PROJ, Dtype::F32, &[64, 32]), (NORM, Dtype::BF16, &[32])])?;
    folder(&[("model.safetensors", bytes)])
}

/// An index mapping each tensor to a shard file.
fn index(entries: &[(&str, &str)]) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(t, f)| (t.to_string(), (*f).into()))
        .collect();
    serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map })
        .to_string()
        .into_bytes()
}

fn open_err(dir: &Path) -> Result<CheckpointError> {
    match Checkpoint::open(dir) {
        Ok(ckpt) => bail!("{} opened: {ckpt:?}", dir.display()),
        Err(e) => Ok(e),
    }
}

fn load_err(
    ckpt: &Checkpoint,
    name: &str,
    shape: &[usize],
    slice: Slice,
) -> Result<CheckpointError> {
    match ckpt.load(name, shape, slice) {
        Ok(t) => bail!("loaded {name}: {t:?}"),
        Err(e) => Ok(e),
    }
}

/// The error's message contains every part.
fn mentions(err: &CheckpointError, parts: &[&str]) -> Result<()> {
    let msg = err.to_string();
    for part in parts {
        ensure!(msg.contains(part), "message lacks {part:?}: {msg}");
    }
    Ok(())
}

#[test]
fn nonexistent_folder_is_io() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let err = open_err(&dir.path().join("no-such-model"))?;
    ensure!(matches!(err, CheckpointError::Io { .. }), "{err}");
    mentions(&err, &["no-such-model"])
}

#[test]
fn empty_folder_has_no_weights() -> Result<()> {
    let dir = folder(&[("config.json", b"{}".to_vec())])?;
    let err = open_err(dir.path())?;
    ensure!(matches!(err, CheckpointError::NoWeights { .. }), "{err}");
    mentions(
        &err,
        &[&dir.path().display().to_string(), "model.safetensors"],
    )
}

#[test]
fn truncated_file_names_first_cut_tensor() -> Result<()> {
    let dir = model()?;
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path)?;
    // q_proj is stored first (safetensors orders f32 before bf16), the 64-byte norm last.
    std::fs::write(&path, &bytes[..bytes.len() - 3])?;
    let err = open_err(dir.path())?;
    ensure!(
        matches!(&err, CheckpointError::Truncated { tensor, .. } if tensor == NORM),
        "layout assumption: {err}"
    );
    // Cutting into q_proj cuts off the norm too; the first affected tensor is the one to name.
    std::fs::write(&path, &bytes[..bytes.len() - 64 - 100])?;
    let err = open_err(dir.path())?;
    ensure!(
        matches!(&err, CheckpointError::Truncated { tensor, .. } if tensor == Q_PROJ),
        "{err}"
    );
    mentions(&err, &["model.safetensors", Q_PROJ, "truncated"])
}

#[test]
fn garbage_header_is_bad_header() -> Result<()> {
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{not json at all");
    for garbage in [bytes, vec![0xff; 64], vec![1, 2, 3]] {
        let dir = folder(&[("model.safetensors", garbage)])?;
        let err = open_err(dir.path())?;
        ensure!(matches!(err, CheckpointError::BadHeader { .. }), "{err}");
        mentions(&err, &["model.safetensors"])?;
    }
    Ok(())
}

#[test]
fn header_length_beyond_file_is_bad_header() -> Result<()> {
    let dir = model()?;
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path)?;
    let too_long = bytes.len() as u64 + 100;
    bytes[..8].copy_from_slice(&too_long.to_le_bytes());
    std::fs::write(&path, bytes)?;
    let err = open_err(dir.path())?;
    ensure!(matches!(err, CheckpointError::BadHeader { .. }), "{err}");
    mentions(
        &err,
        &["model.safetensors", &too_long.to_string(), "beyond"],
    )
}

#[test]
fn index_pointing_to_missing_shard() -> Result<()> {
    let dir = model()?;
    let idx = index(&[
        (Q_PROJ, "model.safetensors"),
        (NORM, "model-00002-of-00002.safetensors"),
    ]);
    std::fs::write(dir.path().join(INDEX), idx)?;
    let err = open_err(dir.path())?;
    ensure!(matches!(err, CheckpointError::MissingShard { .. }), "{err}");
    mentions(&err, &[INDEX, "model-00002-of-00002.safetensors"])
}

#[test]
fn malformed_index_json() -> Result<()> {
    let dir = model()?;
    std::fs::write(
        dir.path().join(INDEX),
        br#"{"weight_map": {"a": "model.safetensors""#,
    )?;
    let err = open_err(dir.path())?;
    ensure!(matches!(err, CheckpointError::BadIndex { .. }), "{err}");
    mentions(&err, &[INDEX, "invalid JSON"])
}

#[test]
fn index_listing_tensor_absent_from_shard() -> Result<()> {
    let dir = model()?;
    let missing = "model.layers.0.self_attn.k_proj.weight";
    let idx = index(&[
        (Q_PROJ, "model.safetensors"),
        (missing, "model.safetensors"),
    ]);
    std::fs::write(dir.path().join(INDEX), idx)?;
    let err = open_err(dir.path())?;
    ensure!(matches!(err, CheckpointError::BadIndex { .. }), "{err}");
    mentions(&err, &[INDEX, missing, "model.safetensors"])
}

#[test]
fn unsupported_dtype_names_tensor_file_and_dtype() -> Result<()> {
    for (dtype, text) in [(Dtype::I64, "I64"), (Dtype::F64, "F64")] {
        let bytes = safetensors_bytes(&[("position_ids", dtype, &[1, 8])])?;
        let dir = folder(&[("model.safetensors", bytes)])?;
        // Opening succeeds: checkpoints carry tensors we never read, in dtypes we do not support.
        let ckpt = Checkpoint::open(dir.path())?;
        let err = load_err(&ckpt, "position_ids", &[1, 8], Slice::Full)?;
        ensure!(
            matches!(err, CheckpointError::UnsupportedDtype { .. }),
            "{err}"
        );
        mentions(&err, &["position_ids", "model.safetensors", text])?;
        ensure!(matches!(
            ckpt.info("position_ids"),
            Err(CheckpointError::UnsupportedDtype { .. })
        ));
    }
    Ok(())
}

#[test]
fn missing_tensor_suggests_similar_names() -> Result<()> {
    let dir = model()?;
    let ckpt = Checkpoint::open(dir.path())?;
    let wanted = "model.layers.0.self_attn.q_proj.bias";
    let err = load_err(&ckpt, wanted, &[64], Slice::Full)?;
    ensure!(
        matches!(err, CheckpointError::MissingTensor { .. }),
        "{err}"
    );
    mentions(
        &err,
        &[
            wanted,
            &dir.path().display().to_string(),
            "2 tensors",
            Q_PROJ,
        ],
    )
}

#[test]
fn shape_mismatch_names_tensor_file_and_both_shapes() -> Result<()> {
    let dir = model()?;
    let ckpt = Checkpoint::open(dir.path())?;
    let err = load_err(&ckpt, Q_PROJ, &[48, 32], Slice::Rows(0..24))?;
    ensure!(
        matches!(err, CheckpointError::ShapeMismatch { .. }),
        "{err}"
    );
    let want = format!(
        "tensor `{Q_PROJ}` in model.safetensors has shape [64, 32], but config.json implies [48, 32]"
    );
    ensure!(err.to_string() == want, "{err}");
    Ok(())
}

#[test]
fn out_of_range_slices_are_bad_slices() -> Result<()> {
    let dir = model()?;
    let ckpt = Checkpoint::open(dir.path())?;
    for (name, shape, slice, part) in [
        (Q_PROJ, &[64usize, 32][..], Slice::Rows(60..65), "60..65"),
        (Q_PROJ, &[64, 32], Slice::Cols(16..33), "16..33"),
        (NORM, &[32], Slice::Cols(0..16), "2-D"),
    ] {
        let err = load_err(&ckpt, name, shape, slice)?;
        ensure!(matches!(err, CheckpointError::BadSlice { .. }), "{err}");
        mentions(&err, &[name, part])?;
    }
    ensure!(
        ckpt.touched().is_empty(),
        "failed loads were recorded: {:?}",
        ckpt.touched()
    );
    Ok(())
}
