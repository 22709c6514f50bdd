//! A decoder model assembled from a [`ModelSpec`]: embedding, the layer stack, final norm and the
//! output projection. One forward step runs any mix of prefill chunks and decode tokens of several
//! sequences, writing their keys and values into the paged cache.

use std::sync::Arc;
use std::time::Instant;

use tessera_common::{AttentionSpec, FfnSpec, ModelSpec, ShardSpec};
use tessera_kernels::{AttentionParams, Backend, KvSpec, RopeTable, RowSummary, StepMeta};

use crate::WorkerError;
use crate::checkpoint::Checkpoint;
use crate::checkpoint::Slice;
use crate::collective::Collective;
use crate::kv_cache::KvCache;
use crate::layers::{
    Gqa, Linear, Mla, MlaAttend, MlaForm, MlaPlan, MlaPolicy, Mlp, Moe, RmsNorm, SplitAttend,
    SplitStep, TpContext, WeightLoader,
};
use crate::results::StepResults;

enum Attention<B: Backend> {
    Gqa(Gqa<B>),
    Mla(Mla<B>),
}

enum Ffn<B: Backend> {
    Dense(Mlp<B>),
    Moe(Moe<B>),
}

struct DecoderLayer<B: Backend> {
    input_norm: RmsNorm<B>,
    post_attention_norm: RmsNorm<B>,
    attention: Attention<B>,
    ffn: Ffn<B>,
}

/// The logits rows a step asks for.
#[derive(Clone, Copy, Debug)]
pub struct LogitRows<'a> {
    /// Indices into the step's tokens.
    pub rows: &'a [usize],
    /// Per row, whether the whole row is needed on the host; the others (plain greedy sampling)
    /// only need their [`RowSummary`], which spares a device the copy of the vocabulary.
    pub full: &'a [bool],
}

impl LogitRows<'_> {
    /// Whether the rows are every one of a step's `n` tokens, in order (decode): the logits need
    /// no gather.
    pub fn is_every_row(&self, n: usize) -> bool {
        self.rows.iter().copied().eq(0..n)
    }

    /// The rows whose [`RowSummary`] the host needs: every row when some row is not full
    /// (summaries are made for a step's rows together), none otherwise.
    pub fn summarised(&self) -> &[usize] {
        if self.full.iter().all(|&f| f) {
            &[]
        } else {
            self.rows
        }
    }
}

/// What one step produces.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    /// `[full rows, vocab]` logits of the rows marked full, in their order, row-major.
    pub logits: Vec<f32>,
    /// The summary of every requested row, in order, when some row is not full (else empty).
    pub summaries: Vec<RowSummary>,
    /// Tokens routed to each expert, per MoE layer (layer index, counts).
    pub expert_counts: Vec<(usize, Vec<u32>)>,
}

pub struct Model<B: Backend> {
    backend: B,
    spec: ModelSpec,
    embed: B::Weight,
    /// `None` when tied to the embedding table.
    lm_head: Option<Linear<B>>,
    final_norm: RmsNorm<B>,
    layers: Vec<DecoderLayer<B>>,
    rope: RopeTable,
    tp: TpContext<B>,
    mla: MlaPolicy,
}

/// Bytes of the tensors `shard` will not read (experts owned elsewhere), for the progress total.
fn skipped_bytes(spec: &ModelSpec, ckpt: &Checkpoint, shard: &ShardSpec) -> u64 {
    let mut skipped = 0;
    for (l, layer) in spec.layers.iter().enumerate() {
        let FfnSpec::Moe(m) = &layer.ffn else {
            continue;
        };
        for e in (0..m.num_experts).filter(|e| !shard.owns_expert(l, *e, m.num_experts)) {
            for name in m.expert(e).names() {
                if let Ok(info) = ckpt.info(&name) {
                    skipped +=
                        info.shape.iter().product::<usize>() as u64 * info.dtype.size() as u64;
                }
            }
        }
    }
    skipped
}

impl<B: Backend> Model<B> {
    /// Loads the model on one worker (`shard` may still leave out experts, for tests and tools).
    pub fn load(
        backend: B,
        spec: ModelSpec,
        ckpt: &Checkpoint,
        shard: &ShardSpec,
    ) -> Result<Self, WorkerError> {
        if shard.world_size > 1 {
            return Err(WorkerError::Plan(format!(
                "world size {} needs a collective: use Model::load_rank",
                shard.world_size
            )));
        }
        Self::load_rank(
            backend,
            spec,
            ckpt,
            TpContext {
                shard: shard.clone(),
                ..TpContext::single()
            },
        )
    }

    /// Loads the part of the model one tensor-parallel rank owns.
    pub fn load_rank(
        backend: B,
        spec: ModelSpec,
        ckpt: &Checkpoint,
        tp: TpContext<B>,
    ) -> Result<Self, WorkerError> {
        let shard = &tp.shard;
        let started = Instant::now();
        let planned = ckpt
            .total_bytes()
            .saturating_sub(skipped_bytes(&spec, ckpt, shard));
        tracing::info!(dir = %ckpt.dir().display(), mib = planned / (1 << 20), "loading weights");
        let w = WeightLoader::new(&backend, ckpt, planned);
        let (hidden, eps) = (spec.hidden_size, spec.rms_norm_eps);
        let mut layers = Vec::with_capacity(spec.layers.len());
        for (i, l) in spec.layers.iter().enumerate() {
            layers.push(DecoderLayer {
                input_norm: RmsNorm::load(&w, &l.input_norm, hidden, eps)?,
                post_attention_norm: RmsNorm::load(&w, &l.post_attention_norm, hidden, eps)?,
                attention: match &l.attention {
                    AttentionSpec::Gqa(a) => Attention::Gqa(Gqa::load(&w, a, (hidden, eps), &tp)?),
                    AttentionSpec::Mla(a) => Attention::Mla(Mla::load(&w, a, hidden, &tp)?),
                },
                ffn: match &l.ffn {
                    FfnSpec::Dense(m) => Ffn::Dense(Mlp::load_split(&w, m, hidden, &tp)?),
                    FfnSpec::Moe(m) => Ffn::Moe(Moe::load(&w, m, i, hidden, &tp)?),
                },
            });
        }
        let embed = w.matrix(&spec.embed_tokens, spec.vocab_size, hidden)?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            // Vocabulary-parallel: each rank computes its slice of the logits, then all-gather.
            let part = if tp.world() > 1 {
                Slice::Rows(tp.shard.split(spec.vocab_size))
            } else {
                Slice::Full
            };
            Some(Linear {
                weight: w.load(&spec.lm_head, &[spec.vocab_size, hidden], part)?,
                bias: None,
            })
        };
        let final_norm = RmsNorm::load(&w, &spec.final_norm, hidden, eps)?;
        let bytes = w.finish();
        tracing::info!(
            architecture = %spec.architecture,
            layers = spec.layers.len(),
            mib = bytes / (1 << 20),
            secs = format!("{:.2}", started.elapsed().as_secs_f32()),
            backend = %backend.name(),
            "model loaded"
        );
        let rope = RopeTable {
            inv_freq: spec.rope.inv_freq(),
            attention_scaling: spec.rope.attention_scaling() as f32,
            layout: spec.rope.layout,
        };
        Ok(Model {
            backend,
            spec,
            embed,
            lm_head,
            final_norm,
            layers,
            rope,
            tp,
            mla: MlaPolicy::default(),
        })
    }

    /// Sets when MLA layers attend in the expanded form (no effect on other attention).
    pub fn set_mla_policy(&mut self, policy: MlaPolicy) {
        self.mla = policy;
    }

    pub fn mla_policy(&self) -> MlaPolicy {
        self.mla
    }

    /// The first MLA layer, if the model has latent attention (every MLA layer has the same
    /// shape and the same heads on this rank).
    fn first_mla(&self) -> Option<&Mla<B>> {
        self.layers.iter().find_map(|l| match &l.attention {
            Attention::Mla(a) => Some(a),
            Attention::Gqa(_) => None,
        })
    }

    pub(crate) fn has_mla(&self) -> bool {
        self.first_mla().is_some()
    }

    /// How MLA layers attend in an eagerly run step over `meta` (absorbed without MLA).
    pub(crate) fn mla_plan(&self, meta: &StepMeta) -> MlaPlan {
        match self.first_mla() {
            Some(mla) => self.mla.plan(mla.spec(), mla.params().num_heads, meta),
            None => MlaPlan::Whole(MlaForm::Absorbed),
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The KV-cache shape of every layer for a pool of `num_blocks` blocks.
    pub fn kv_specs(&self, num_blocks: usize, block_size: usize) -> Vec<KvSpec> {
        self.layers
            .iter()
            .map(|l| {
                let (p, values): (&AttentionParams, _) = match &l.attention {
                    Attention::Gqa(a) => (a.params(), a.kv_values()),
                    Attention::Mla(a) => (a.params(), a.kv_values()),
                };
                KvSpec {
                    num_blocks,
                    block_size,
                    num_kv_heads: p.num_kv_heads,
                    k_dim: p.qk_dim,
                    v_dim: p.v_dim,
                    values,
                }
            })
            .collect()
    }

    /// Runs one step over `meta`'s tokens and returns what `logits` asks for.
    pub fn forward(
        &self,
        meta: &StepMeta,
        cache: &mut KvCache<B>,
        logits: LogitRows<'_>,
    ) -> Result<StepOutput, WorkerError> {
        let b = &self.backend;
        self.check_step(meta, cache, logits)?;
        let (step, out) = match self.mla_plan(meta) {
            MlaPlan::Whole(form) => {
                let mut step = b.prepare_step(meta, &self.rope)?;
                if let MlaForm::Expanded(e) = form {
                    b.prepare_context(&mut step, e.chunk)?;
                }
                // Decode keeps every row in order: no gather (a launch and an upload on a GPU).
                let keep = (!logits.is_every_row(meta.num_tokens())).then_some(logits.rows);
                let out = self.run(&step, cache, keep, &MlaAttend::Whole(form))?;
                (step, out)
            }
            MlaPlan::Split {
                absorbed,
                expansion,
            } => {
                // The absorbed sequences first; the rows asked for follow their tokens.
                let split = SplitStep::new(meta, &absorbed);
                let step = b.prepare_step(&split.meta, &self.rope)?;
                let absorbed = b.prepare_step(&split.absorbed, &self.rope)?;
                let mut expanded = b.prepare_step(&split.expanded, &self.rope)?;
                b.prepare_context(&mut expanded, expansion.chunk)?;
                let keep: Vec<usize> = logits.rows.iter().map(|&r| split.token_at[r]).collect();
                let attend = MlaAttend::Split(SplitAttend {
                    absorbed_tokens: split.absorbed_tokens(),
                    absorbed: &absorbed,
                    expanded: &expanded,
                    expansion,
                });
                let out = self.run(&step, cache, Some(&keep), &attend)?;
                (step, out)
            }
        };
        let host_logits = self.full_rows_to_host(&out.logits, logits)?;
        // The summaries (when some row is sampled on the host's behalf) and the expert counts
        // come back in one copy.
        let summary_rows = logits.summarised().len();
        let mut results = StepResults::new(b, &self.moe_layers(), summary_rows)?;
        results.fill(b, &out, summary_rows, &step)?;
        let back = results.to_host(b, 0..summary_rows)?;
        Ok(StepOutput {
            logits: host_logits,
            summaries: back.summaries,
            expert_counts: back.expert_counts,
        })
    }

    /// Checks a step's description against the model, the cache and the rows asked for.
    pub(crate) fn check_step(
        &self,
        meta: &StepMeta,
        cache: &KvCache<B>,
        logits: LogitRows<'_>,
    ) -> Result<(), WorkerError> {
        if logits.full.len() != logits.rows.len() {
            return Err(WorkerError::Request(format!(
                "{} logits rows with {} full-row flags",
                logits.rows.len(),
                logits.full.len()
            )));
        }
        let n = meta.num_tokens();
        if meta.tokens.len() != n {
            return Err(WorkerError::Request(format!(
                "{} tokens for a step describing {n}",
                meta.tokens.len(),
            )));
        }
        if let Some(&row) = logits.rows.iter().find(|&&r| r >= n) {
            return Err(WorkerError::Request(format!(
                "logits row {row} of a step of {n} tokens"
            )));
        }
        let vocab = self.spec.vocab_size;
        if let Some(&id) = meta.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(WorkerError::Request(format!(
                "token id {id} outside the vocabulary of {vocab}"
            )));
        }
        if cache.layers.len() != self.layers.len() {
            return Err(WorkerError::Request(format!(
                "KV cache has {} layers, model {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// The device half of a step over `step`: every layer, then the logits of the rows in
    /// `keep` (every row when `None`), and each MoE layer's routing for the expert counts. No
    /// copy to or from the host, so a graph can capture it. MLA layers attend as `attend` says
    /// (the expanded form needs a step made ready by [`Backend::prepare_context`]).
    pub(crate) fn run(
        &self,
        step: &B::Step,
        cache: &mut KvCache<B>,
        keep: Option<&[usize]>,
        attend: &MlaAttend<'_, B>,
    ) -> Result<DeviceOutput<B>, WorkerError> {
        let b = &self.backend;
        let mut x = b.embedding(&self.embed, step)?;
        // (layer, experts, routing) of every MoE layer, counted after the last layer.
        let mut routings = Vec::new();
        // The previous layer's FFN output, added to the residual stream together with this
        // layer's input norm (one fused op where the backend has one).
        let mut pending: Option<B::Tensor> = None;
        for (i, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let h = match pending.take() {
                Some(f) => layer.input_norm.add_forward(b, &mut x, &f)?,
                None => layer.input_norm.forward(b, &x)?,
            };
            let mut a = match &layer.attention {
                Attention::Gqa(att) => att.forward(b, &h, kv, step)?,
                Attention::Mla(att) => att.forward(b, &h, kv, step, attend)?,
            };
            self.tp.all_reduce(b, &mut a)?;
            let h = layer.post_attention_norm.add_forward(b, &mut x, &a)?;
            let mut f = match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward(b, &h)?,
                Ffn::Moe(moe) => {
                    let (y, routing) = moe.forward_routed(b, &h)?;
                    routings.push((i, moe.num_experts(), routing));
                    y
                }
            };
            self.tp.all_reduce(b, &mut f)?;
            pending = Some(f);
        }
        if let Some(f) = pending {
            b.add_assign(&mut x, &f)?;
        }
        let kept = match keep {
            Some(rows) => b.gather_rows(&x, rows)?,
            None => x,
        };
        let x = self.final_norm.forward(b, &kept)?;
        let logits = match &self.lm_head {
            Some(head) if self.tp.world() > 1 => {
                self.tp.comm.all_gather_cols(b, head.forward(b, &x)?)?
            }
            Some(head) => head.forward(b, &x)?,
            None => b.linear(&x, &self.embed, None)?,
        };
        Ok(DeviceOutput { logits, routings })
    }

    /// The values of the rows of `all` marked full, in order (`all`: one row per requested row,
    /// in order, then possibly rows of no interest, a graph's padding).
    pub(crate) fn full_rows_to_host(
        &self,
        all: &B::Tensor,
        logits: LogitRows<'_>,
    ) -> Result<Vec<f32>, WorkerError> {
        let b = &self.backend;
        let n = logits.rows.len();
        let full: Vec<usize> = (0..n).filter(|&i| logits.full[i]).collect();
        Ok(if full.is_empty() {
            Vec::new()
        } else if full.len() == n && b.dims(all).0 == n {
            b.tensor_to_host(all)?
        } else {
            b.tensor_to_host(&b.gather_rows(all, &full)?)?
        })
    }

    /// The RoPE table steps are prepared with.
    pub(crate) fn rope(&self) -> &RopeTable {
        &self.rope
    }

    /// `(layer, experts)` of every MoE layer, in order: what [`Model::run`]'s routings are.
    pub(crate) fn moe_layers(&self) -> Vec<(usize, usize)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.ffn {
                Ffn::Moe(m) => Some((i, m.num_experts())),
                Ffn::Dense(_) => None,
            })
            .collect()
    }

    /// Ranks the model is split over (tensor parallelism).
    pub(crate) fn world(&self) -> usize {
        self.tp.world()
    }

    /// This rank's index among them.
    pub(crate) fn rank(&self) -> usize {
        self.tp.shard.rank
    }

    /// Puts `comm` in the place of the collective the model joins its ranks with, and returns
    /// the one it replaced.
    pub(crate) fn replace_comm(&mut self, comm: Arc<dyn Collective<B>>) -> Arc<dyn Collective<B>> {
        std::mem::replace(&mut self.tp.comm, comm)
    }
}

/// The device half of a step ([`Model::run`]).
pub(crate) struct DeviceOutput<B: Backend> {
    /// `[kept rows, vocab]`.
    pub logits: B::Tensor,
    /// `(layer, experts, routing)` of every MoE layer, in layer order.
    pub routings: Vec<(usize, usize, B::Routing)>,
}
