//! Bytes of weights a decode step reads: the denominator of a memory-bandwidth roofline.
//!
//! Decoding is bound by how many weight bytes stream from memory per step. Dense weights
//! (attention, norms, routers, shared experts, dense MLPs, the output projection) are read once per
//! step whatever the batch; each routed expert is read once per step if at least one token of the
//! step chose it (the CPU MoE kernel groups tokens by expert); the embedding table contributes one
//! row per token. [`WeightFootprint`] classifies every tensor the model loaded that way, with sizes
//! in the checkpoint's stored dtypes.

use std::collections::HashMap;

use serde::Serialize;
use tessera_common::{FfnSpec, ModelSpec};

use crate::WorkerError;
use crate::checkpoint::Checkpoint;

/// The routed experts of one MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MoeLayerBytes {
    pub layer: usize,
    pub top_k: usize,
    /// Bytes of each expert's projections, by expert id (0 for experts not loaded here).
    pub expert_bytes: Vec<u64>,
    /// Elements (multiply-adds per token) of each expert's projections.
    pub expert_elems: Vec<u64>,
}

impl MoeLayerBytes {
    /// Mean over the experts loaded here.
    fn mean(v: &[u64]) -> f64 {
        let loaded: Vec<u64> = v.iter().copied().filter(|b| *b > 0).collect();
        loaded.iter().sum::<u64>() as f64 / loaded.len().max(1) as f64
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightFootprint {
    /// Every weight the model loaded.
    pub total_bytes: u64,
    /// One row of the embedding table.
    pub embedding_row_bytes: u64,
    /// Read once per step whatever the batch.
    pub dense_bytes: u64,
    /// Multiply-adds per token of the dense matrices (the output projection included).
    pub dense_macs: u64,
    pub moe_layers: Vec<MoeLayerBytes>,
}

impl WeightFootprint {
    /// Classifies the tensors `ckpt` handed out so far (call it after loading the model).
    pub fn of_loaded(spec: &ModelSpec, ckpt: &Checkpoint) -> Result<Self, WorkerError> {
        let mut moe_layers = Vec::new();
        // experts prefix + '.' → index into moe_layers.
        let mut prefixes = HashMap::new();
        for (l, layer) in spec.layers.iter().enumerate() {
            if let FfnSpec::Moe(m) = &layer.ffn {
                prefixes.insert(format!("{}.", m.experts_prefix), moe_layers.len());
                moe_layers.push(MoeLayerBytes {
                    layer: l,
                    top_k: m.top_k,
                    expert_bytes: vec![0; m.num_experts],
                    expert_elems: vec![0; m.num_experts],
                });
            }
        }
        let mut fp = WeightFootprint {
            total_bytes: 0,
            embedding_row_bytes: 0,
            dense_bytes: 0,
            dense_macs: 0,
            moe_layers,
        };
        for name in ckpt.touched() {
            let info = ckpt.info(&name)?;
            let elems = info.shape.iter().product::<usize>() as u64;
            let bytes = elems * info.dtype.size() as u64;
            // Vectors (norms, biases) scale or add: no multiply-adds to speak of.
            let macs = if info.shape.len() == 2 { elems } else { 0 };
            fp.total_bytes += bytes;
            if name == spec.embed_tokens {
                fp.embedding_row_bytes = bytes / spec.vocab_size.max(1) as u64;
                if spec.tie_word_embeddings {
                    // The output projection reads the whole table every step.
                    fp.dense_bytes += bytes;
                    fp.dense_macs += macs;
                }
                continue;
            }
            let expert = prefixes.iter().find_map(|(p, &i)| {
                let rest = name.strip_prefix(p.as_str())?;
                let e: usize = rest.split('.').next()?.parse().ok()?;
                Some((i, e))
            });
            match expert {
                Some((i, e)) if e < fp.moe_layers[i].expert_bytes.len() => {
                    fp.moe_layers[i].expert_bytes[e] += bytes;
                    fp.moe_layers[i].expert_elems[e] += macs;
                }
                _ => {
                    fp.dense_bytes += bytes;
                    fp.dense_macs += macs;
                }
            }
        }
        Ok(fp)
    }

    /// Bytes read to decode one token alone: the embedding row, every dense weight, and `top_k`
    /// (average-sized) experts per MoE layer.
    pub fn active_bytes_per_token(&self) -> u64 {
        let experts: f64 = self
            .moe_layers
            .iter()
            .map(|m| m.top_k as f64 * MoeLayerBytes::mean(&m.expert_bytes))
            .sum();
        self.embedding_row_bytes + self.dense_bytes + experts.round() as u64
    }

    /// Weight multiply-adds per decoded token (attention over the context not included).
    pub fn macs_per_token(&self) -> u64 {
        let experts: f64 = self
            .moe_layers
            .iter()
            .map(|m| m.top_k as f64 * MoeLayerBytes::mean(&m.expert_elems))
            .sum();
        self.dense_macs + experts.round() as u64
    }

    /// Bytes read by a step of `tokens` tokens whose routing chose `counts` (per MoE layer, tokens
    /// per expert, as [`StepResult::expert_counts`](crate::executor::StepResult) reports).
    pub fn step_bytes(&self, tokens: usize, counts: &[(usize, Vec<u32>)]) -> u64 {
        let mut bytes = self.embedding_row_bytes * tokens as u64 + self.dense_bytes;
        for (layer, c) in counts {
            if let Some(m) = self.moe_layers.iter().find(|m| m.layer == *layer) {
                bytes += c
                    .iter()
                    .zip(&m.expert_bytes)
                    .filter(|(n, _)| **n > 0)
                    .map(|(_, b)| *b)
                    .sum::<u64>();
            }
        }
        bytes
    }

    /// Expected bytes of a step of `tokens` tokens if every token picks its `top_k` experts
    /// uniformly at random: each expert is read with probability `1 - (1 - k/E)^tokens`.
    pub fn expected_step_bytes(&self, tokens: usize) -> f64 {
        let mut bytes = (self.embedding_row_bytes * tokens as u64 + self.dense_bytes) as f64;
        for m in &self.moe_layers {
            let e = m.expert_bytes.len().max(1) as f64;
            let p_read = 1.0 - (1.0 - m.top_k as f64 / e).powi(tokens as i32);
            bytes += p_read * m.expert_bytes.iter().sum::<u64>() as f64;
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{SyntheticModel, ensure_checkpoint};
    use tessera_common::ShardSpec;
    use tessera_kernels::cpu::CpuBackend;

    #[test]
    fn footprint_of_a_synthetic_model_counts_every_tensor_once() {
        let root = tempfile::tempdir().unwrap();
        let m = SyntheticModel::tiny();
        let (dir, _) = ensure_checkpoint(&root.path().join("m"), &m, 3).unwrap();
        let spec = tessera_common::load_model_spec(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        crate::model::Model::load(CpuBackend, spec.clone(), &ckpt, &ShardSpec::whole()).unwrap();
        let fp = WeightFootprint::of_loaded(&spec, &ckpt).unwrap();
        assert_eq!(fp.total_bytes, ckpt.total_bytes());
        let h = m.hidden_size as u64;
        assert_eq!(fp.embedding_row_bytes, 2 * h);
        let expert = 2 * 3 * h * m.moe_intermediate_size as u64;
        assert!(
            fp.moe_layers
                .iter()
                .all(|l| l.expert_bytes == vec![expert; 8])
        );
        let q = (m.num_heads * m.head_dim) as u64;
        let kv = (m.num_kv_heads * m.head_dim) as u64;
        let per_layer = 2 * (2 * h + 2 * m.head_dim as u64 + 2 * q * h + 2 * kv * h + 8 * h);
        let dense = m.num_layers as u64 * per_layer + 2 * h + 2 * h * m.vocab_size as u64;
        assert_eq!(fp.dense_bytes, dense);
        let dense_macs =
            m.num_layers as u64 * (2 * q * h + 2 * kv * h + 8 * h) + h * m.vocab_size as u64;
        assert_eq!(fp.dense_macs, dense_macs);
        assert_eq!(
            fp.macs_per_token(),
            dense_macs + m.num_layers as u64 * expert
        );
        let active = 2 * h + dense + m.num_layers as u64 * 2 * expert;
        assert_eq!(fp.active_bytes_per_token(), active);
        // One token choosing experts 0 and 5 in both layers reads what a lone token reads.
        let mut c = vec![0u32; 8];
        c[0] = 1;
        c[5] = 1;
        assert_eq!(fp.step_bytes(1, &[(0, c.clone()), (1, c)]), active);
        assert!((fp.expected_step_bytes(1) - active as f64).abs() < 1.0);
        // Many tokens read every expert.
        let all = fp.expected_step_bytes(1000);
        assert!((all - (2000 * h + dense + 16 * expert) as f64).abs() < 1.0);
    }
}
