//! Hugging Face checkpoint folders: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.
//!
//! Every file is memory-mapped and its header validated when the checkpoint is opened, so a
//! truncated or corrupt download fails before any model is built, naming the file and tensor.
//! Loading then costs nothing for whole tensors (they are borrowed from the mapping) and only the
//! requested bytes for tensor-parallel slices. Each load is checked against the shape the model
//! config implies, and recorded, so tests can prove a worker never reads weights it does not own.

mod error;
mod file;
#[cfg(feature = "fuzz-targets")]
pub mod fuzz_targets;
mod index;
mod slice;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use safetensors::Dtype;
use tessera_kernels::{DType, HostTensor};

pub use error::CheckpointError;
pub use slice::Slice;

use file::{Entry, Shard, open_shard};
use index::{INDEX_FILE, read_index};

/// File name of an unsharded checkpoint.
const SINGLE_FILE: &str = "model.safetensors";

/// A Hugging Face model folder's weights. Files are memory-mapped; headers parsed and validated
/// at open.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Located>,
    touched: Mutex<BTreeSet<String>>,
}

/// A tensor's entry and the index of the shard holding it.
struct Located {
    shard: usize,
    entry: Entry,
}

/// A tensor's dtype and shape as stored, and the file holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub file: PathBuf,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir`. Prefers `model.safetensors.index.json` when present, else
    /// `model.safetensors`; failing both, opens every `*.safetensors` file in the folder.
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let (shards, tensors) = if index.is_file() {
            open_indexed(dir, &index)?
        } else if single.is_file() {
            open_files(&[single])?
        } else {
            let files = list_safetensors(dir)?;
            if files.is_empty() {
                return Err(CheckpointError::NoWeights {
                    dir: dir.to_path_buf(),
                });
            }
            open_files(&files)?
        };
        tracing::debug!(
            dir = %dir.display(),
            files = shards.len(),
            tensors = tensors.len(),
            "opened checkpoint"
        );
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            tensors,
            touched: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// dtype and shape as stored.
    pub fn info(&self, name: &str) -> Result<TensorInfo, CheckpointError> {
        let (shard, entry) = self.lookup(name)?;
        Ok(TensorInfo {
            dtype: supported_dtype(name, shard, entry)?,
            shape: entry.shape.clone(),
            file: shard.path.clone(),
        })
    }

    /// Loads a tensor (or a slice of it), checking it against `expected_shape`, the FULL shape
    /// implied by the model config. Whole tensors are borrowed zero-copy from the mapping;
    /// slices are copied, reading only their own bytes. Records the name in [`Self::touched`].
    pub fn load(
        &self,
        name: &str,
        expected_shape: &[usize],
        slice: Slice,
    ) -> Result<HostTensor, CheckpointError> {
        let (shard, entry) = self.lookup(name)?;
        let dtype = supported_dtype(name, shard, entry)?;
        if entry.shape != expected_shape {
            return Err(CheckpointError::ShapeMismatch {
                tensor: name.to_string(),
                file: shard.path.clone(),
                expected: expected_shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let tensor = slice::read(&shard.map, name, entry, dtype, &slice)?;
        self.touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
        Ok(tensor)
    }

    /// Names loaded so far.
    pub fn touched(&self) -> BTreeSet<String> {
        self.touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sum of the on-disk bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.entry.end - t.entry.start) as u64)
            .sum()
    }

    fn lookup(&self, name: &str) -> Result<(&Shard, &Entry), CheckpointError> {
        self.tensors
            .get(name)
            .and_then(|t| Some((self.shards.get(t.shard)?, &t.entry)))
            .ok_or_else(|| CheckpointError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
                available: self.tensors.len(),
                similar: self.similar(name),
            })
    }

    /// Up to three names sharing the longest common prefix with `name`: usually the same layer's
    /// tensors, which shows how this checkpoint spells what the config asked for.
    fn similar(&self, name: &str) -> Vec<String> {
        let common = |k: &str| {
            k.bytes()
                .zip(name.bytes())
                .take_while(|(a, b)| a == b)
                .count()
        };
        let best = self.tensors.keys().map(|k| common(k)).max().unwrap_or(0);
        if best == 0 {
            return Vec::new();
        }
        self.tensors
            .keys()
            .filter(|k| common(k) == best)
            .take(3)
            .cloned()
            .collect()
    }
}

fn supported_dtype(name: &str, shard: &Shard, entry: &Entry) -> Result<DType, CheckpointError> {
    match entry.dtype {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::BF16 => Ok(DType::BF16),
        other => Err(CheckpointError::UnsupportedDtype {
            tensor: name.to_string(),
            file: shard.path.clone(),
            dtype: other.to_string(),
        }),
    }
}

type Opened = (Vec<Shard>, BTreeMap<String, Located>);

/// Opens the shards an index names; the index decides which shard each tensor comes from.
fn open_indexed(dir: &Path, index: &Path) -> Result<Opened, CheckpointError> {
    let weight_map = read_index(index)?;
    let files: BTreeSet<&str> = weight_map.values().map(String::as_str).collect();
    let mut shards = Vec::with_capacity(files.len());
    let mut contents: HashMap<&str, (usize, HashMap<String, Entry>)> = HashMap::new();
    for file in files {
        let path = dir.join(file);
        match path.try_exists() {
            Ok(true) => {}
            Ok(false) => {
                return Err(CheckpointError::MissingShard {
                    index: index.to_path_buf(),
                    shard: path,
                });
            }
            Err(e) => return Err(CheckpointError::io(&path, e)),
        }
        let (shard, entries) = open_shard(&path)?;
        contents.insert(file, (shards.len(), entries.into_iter().collect()));
        shards.push(shard);
    }
    let mut tensors = BTreeMap::new();
    for (name, file) in &weight_map {
        let found = contents
            .get_mut(file.as_str())
            .and_then(|(shard, entries)| Some((*shard, entries.remove(name)?)));
        let Some((shard, entry)) = found else {
            return Err(CheckpointError::bad_index(
                index,
                format!("lists tensor `{name}` in {file}, but that file does not contain it"),
            ));
        };
        tensors.insert(name.clone(), Located { shard, entry });
    }
    let unlisted: usize = contents.values().map(|(_, rest)| rest.len()).sum();
    if unlisted > 0 {
        tracing::debug!(index = %index.display(), unlisted, "ignoring tensors the index does not list");
    }
    Ok((shards, tensors))
}

/// Opens standalone files; a tensor name may appear in only one of them.
fn open_files(paths: &[PathBuf]) -> Result<Opened, CheckpointError> {
    let mut shards: Vec<Shard> = Vec::with_capacity(paths.len());
    let mut tensors = BTreeMap::new();
    for path in paths {
        let (shard, entries) = open_shard(path)?;
        for (name, entry) in entries {
            if let Some(prev) = tensors
                .get(&name)
                .and_then(|t: &Located| shards.get(t.shard))
            {
                return Err(CheckpointError::bad_header(
                    path,
                    format!("tensor `{name}` is also in {}", prev.path.display()),
                ));
            }
            tensors.insert(
                name,
                Located {
                    shard: shards.len(),
                    entry,
                },
            );
        }
        shards.push(shard);
    }
    Ok((shards, tensors))
}

/// The `*.safetensors` files directly in `dir`, sorted for a deterministic open order.
fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut files = Vec::new();
    for item in std::fs::read_dir(dir).map_err(|e| CheckpointError::io(dir, e))? {
        let path = item.map_err(|e| CheckpointError::io(dir, e))?.path();
        if path.extension().is_some_and(|ext| ext == "safetensors") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
