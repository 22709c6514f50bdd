//! Reads weights for the layers: shape-checked against the config, uploaded to the backend in their
//! stored dtype, with a progress bar over the bytes (hidden when stderr is not a terminal).

use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use tessera_kernels::{Backend, HostTensor};

use crate::WorkerError;
use crate::checkpoint::{Checkpoint, Slice};

pub struct WeightLoader<'a, B: Backend> {
    pub backend: &'a B,
    pub checkpoint: &'a Checkpoint,
    progress: ProgressBar,
    bytes: AtomicU64,
}

impl<'a, B: Backend> WeightLoader<'a, B> {
    /// `planned_bytes` sizes the progress bar (the bytes this shard will read).
    pub fn new(backend: &'a B, checkpoint: &'a Checkpoint, planned_bytes: u64) -> Self {
        let progress = ProgressBar::new(planned_bytes);
        if let Ok(style) = ProgressStyle::with_template(
            "loading weights {bar:40.cyan/blue} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        ) {
            progress.set_style(style);
        }
        WeightLoader {
            backend,
            checkpoint,
            progress,
            bytes: AtomicU64::new(0),
        }
    }

    /// Part `slice` of tensor `name`, whose full shape must be `shape`, on the device.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        slice: Slice,
    ) -> Result<B::Weight, WorkerError> {
        let host = self.host(name, shape, slice)?;
        Ok(self.backend.upload_weight(host)?)
    }

    /// As [`WeightLoader::load`], kept on the host for a layer that rearranges it before
    /// uploading (counted as loaded).
    pub fn host(
        &self,
        name: &str,
        shape: &[usize],
        slice: Slice,
    ) -> Result<HostTensor, WorkerError> {
        let host = self.checkpoint.load(name, shape, slice)?;
        let size = host.size_bytes() as u64;
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.progress.inc(size);
        Ok(host)
    }

    /// A `[rows, cols]` matrix.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<B::Weight, WorkerError> {
        self.load(name, &[rows, cols], Slice::Full)
    }

    /// A vector of `len`.
    pub fn vector(&self, name: &str, len: usize) -> Result<B::Weight, WorkerError> {
        self.load(name, &[len], Slice::Full)
    }

    /// Closes the progress bar; returns the bytes loaded.
    pub fn finish(&self) -> u64 {
        self.progress.finish_and_clear();
        self.bytes.load(Ordering::Relaxed)
    }
}
