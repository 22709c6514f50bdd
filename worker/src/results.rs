//! What a step brings back to the host besides full logits rows, packed for one copy: the
//! [`RowSummary`] of each sampled row (what greedy sampling and logprobs need) and every MoE
//! layer's expert counts (what the coordinator balances experts by).
//!
//! On a GPU each copy to the host waits for the stream, so a step that copied its summaries and
//! then its counts synchronised twice. Both are written on the device into one buffer
//! ([`Backend::pack_into`]) and copied once; eager steps and replayed graphs fill it the same way
//! ([`StepResults::fill`]). Layers with the same expert count share one counts tensor
//! ([`CountGroup`]), so every supported architecture counts with one launch per step.

use tessera_kernels::{Backend, RowSummary};

use crate::WorkerError;
use crate::model::DeviceOutput;
#[cfg(doc)]
use crate::model::Model;

/// MoE layers with the same number of experts, whose counts share one tensor.
pub(crate) struct CountGroup {
    pub experts: usize,
    /// Indices into the step's routings.
    pub layers: Vec<usize>,
}

impl CountGroup {
    /// `(layer, counts)` of the group's layers from their counts copied to the host.
    pub fn unpack(&self, host: &[f32], layers: &[usize]) -> Vec<(usize, Vec<u32>)> {
        self.layers
            .iter()
            .zip(host.chunks(self.experts.max(1)))
            .map(|(&i, c)| (layers[i], c.iter().map(|&v| v as u32).collect()))
            .collect()
    }

    /// Elements of the group's counts tensor.
    pub fn len(&self) -> usize {
        self.layers.len() * self.experts
    }
}

/// Groups the routings of layers with `experts` experts each (in routing order) by expert count.
pub(crate) fn count_groups(experts: impl IntoIterator<Item = usize>) -> Vec<CountGroup> {
    let mut groups: Vec<CountGroup> = Vec::new();
    for (i, e) in experts.into_iter().enumerate() {
        match groups.iter_mut().find(|g| g.experts == e) {
            Some(g) => g.layers.push(i),
            None => groups.push(CountGroup {
                experts: e,
                layers: vec![i],
            }),
        }
    }
    groups
}

/// `(layer, counts)` in layer order from `groups`' counts packed one after the other in `host`;
/// `layers` holds the model layer of each routing index.
fn counts_from_packed<'a>(
    groups: impl IntoIterator<Item = &'a CountGroup>,
    host: &[f32],
    layers: &[usize],
) -> Vec<(usize, Vec<u32>)> {
    let (mut out, mut at) = (Vec::with_capacity(layers.len()), 0);
    for group in groups {
        let end = (at + group.len()).min(host.len());
        out.extend(group.unpack(&host[at..end], layers));
        at = end;
    }
    out.sort_by_key(|(layer, _)| *layer);
    out
}

/// The host's half of a step's packed results.
pub(crate) struct HostResults {
    /// The summary of each row asked for, in order.
    pub summaries: Vec<RowSummary>,
    /// `(layer, counts)` of every MoE layer, in layer order.
    pub expert_counts: Vec<(usize, Vec<u32>)>,
}

/// Device buffers a step's summaries and counts are packed into.
pub(crate) struct StepResults<B: Backend> {
    /// Rows whose summaries `packed` has room for.
    rows: usize,
    /// One tensor per group of MoE layers with the same expert count.
    counts: Vec<(CountGroup, B::Tensor)>,
    /// The summaries of `rows` rows, then each group's counts in turn; `None` when that is
    /// nothing (no summaries, no MoE layer).
    packed: Option<B::Tensor>,
    /// The model layer of each MoE layer (routing index).
    layers: Vec<usize>,
}

impl<B: Backend> StepResults<B> {
    /// Buffers for the summaries of up to `rows` rows and the counts of the MoE layers `moe`,
    /// `(layer, experts)` in layer order ([`Model::moe_layers`]).
    pub fn new(b: &B, moe: &[(usize, usize)], rows: usize) -> Result<Self, WorkerError> {
        let mut counts = Vec::new();
        for g in count_groups(moe.iter().map(|l| l.1)) {
            let n = g.layers.len();
            let t = b.zeros(n, g.experts)?;
            counts.push((g, t));
        }
        let len = rows * RowSummary::PACKED + counts.iter().map(|c| c.0.len()).sum::<usize>();
        let packed = match len {
            0 => None,
            _ => Some(b.zeros(1, len)?),
        };
        Ok(StepResults {
            rows,
            counts,
            packed,
            layers: moe.iter().map(|l| l.0).collect(),
        })
    }

    /// Queues, on the device only (a graph can capture it), the summaries of the first
    /// `summary_rows` rows of `ran`'s logits (at most the rows there is room for; 0 for none)
    /// and the expert counts of its MoE layers over `step`.
    pub fn fill(
        &mut self,
        b: &B,
        ran: &DeviceOutput<B>,
        summary_rows: usize,
        step: &B::Step,
    ) -> Result<(), WorkerError> {
        let (logits, routings) = (&ran.logits, &ran.routings);
        let at = self.counts_at();
        let Some(packed) = &mut self.packed else {
            return Ok(());
        };
        let rows = summary_rows.min(self.rows);
        if rows > 0 {
            b.pack_into(packed, 0, &b.summarize_rows(logits, rows)?)?;
        }
        let mut at = at;
        for (group, counts) in &mut self.counts {
            let refs: Vec<&B::Routing> = group.layers.iter().map(|&i| &routings[i].2).collect();
            b.expert_counts_into(&refs, step, counts)?;
            b.pack_into(packed, at, counts)?;
            at += group.len();
        }
        Ok(())
    }

    /// One copy to the host: the summaries of the rows in `wanted` (indices into the rows
    /// [`StepResults::fill`] summarised) and every MoE layer's counts. No copy at all when there
    /// is nothing to bring back.
    pub fn to_host(
        &self,
        b: &B,
        wanted: impl IntoIterator<Item = usize>,
    ) -> Result<HostResults, WorkerError> {
        let host = match &self.packed {
            Some(packed) => b.tensor_to_host(packed)?,
            None => Vec::new(),
        };
        let (packed, counted) = host.split_at(self.counts_at().min(host.len()));
        let all = RowSummary::unpack(packed);
        let summaries = wanted
            .into_iter()
            .map(|r| {
                all.get(r).copied().ok_or_else(|| {
                    WorkerError::Request(format!(
                        "summary of row {r} asked of a step with {} summarised",
                        all.len()
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(HostResults {
            summaries,
            expert_counts: counts_from_packed(
                self.counts.iter().map(|c| &c.0),
                counted,
                &self.layers,
            ),
        })
    }

    /// Where the counts start in the packed buffer.
    fn counts_at(&self) -> usize {
        self.rows * RowSummary::PACKED
    }
}

#[cfg(test)]
mod tests {
    use tessera_kernels::cpu::CpuBackend;
    use tessera_kernels::{RopeTable, RouterParams, Scoring, StepMeta};

    use super::*;

    /// The CPU's step over one sequence prefilling `tokens` tokens.
    fn prefill_step(b: &CpuBackend, tokens: usize) -> <CpuBackend as Backend>::Step {
        let meta = StepMeta::without_ids(
            vec![tessera_kernels::SeqMeta {
                token_start: 0,
                num_tokens: tokens,
                context_len: tokens,
                block_table: vec![0],
            }],
            4,
        );
        let rope = RopeTable {
            inv_freq: vec![1.0],
            attention_scaling: 1.0,
            layout: tessera_kernels::RopeLayout::Half,
        };
        b.prepare_step(&meta, &rope).unwrap()
    }

    #[test]
    fn layers_group_by_expert_count_and_unpack_in_layer_order() {
        // Routings of layers 1, 3 and 4 with 4, 2 and 4 experts.
        let groups = count_groups([4, 2, 4]);
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].experts, &groups[0].layers[..]), (4, &[0, 2][..]));
        assert_eq!((groups[1].experts, &groups[1].layers[..]), (2, &[1][..]));
        // Group 0's two rows, then group 1's.
        let host = [1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 5.0, 6.0];
        let got = counts_from_packed(&groups, &host, &[1, 3, 4]);
        assert_eq!(
            got,
            vec![
                (1, vec![1, 0, 2, 0]),
                (3, vec![5, 6]),
                (4, vec![0, 3, 0, 0]),
            ]
        );
    }

    #[test]
    fn counts_come_back_in_layer_order_whatever_the_expert_counts() {
        let b = CpuBackend;
        // Layers 1, 2 and 4 are MoE; layer 2 has a different number of experts.
        let layers = [(1, 8, 5), (2, 4, 3), (4, 8, 6)];
        let routed: Vec<_> = layers
            .iter()
            .map(|&(layer, experts, tokens)| {
                let logits: Vec<f32> = (0..tokens * experts)
                    .map(|i| ((i * 7 + layer * 5) % 13) as f32)
                    .collect();
                let p = RouterParams {
                    num_experts: experts,
                    top_k: 2,
                    scoring: Scoring::Softmax,
                    normalize: true,
                    groups: None,
                    scaling: 1.0,
                };
                let t = b.tensor_from_host(logits, tokens, experts).unwrap();
                (layer, experts, b.route(&t, &p, None).unwrap())
            })
            .collect();
        let step = prefill_step(&b, 1);
        let moe: Vec<(usize, usize)> = routed.iter().map(|r| (r.0, r.1)).collect();
        let mut results = StepResults::new(&b, &moe, 0).unwrap();
        let ran = DeviceOutput {
            logits: b.tensor_from_host(vec![0.0; 4], 1, 4).unwrap(),
            routings: routed,
        };
        results.fill(&b, &ran, 0, &step).unwrap();
        let got = results.to_host(&b, []).unwrap().expert_counts;
        let want: Vec<_> = ran
            .routings
            .iter()
            .map(|(l, e, r)| (*l, b.expert_counts(r, *e).unwrap()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got[1].1.len(), 4);
        // No MoE layer and no summaries: nothing to copy, nothing back.
        let mut none = StepResults::<CpuBackend>::new(&b, &[], 0).unwrap();
        let bare = DeviceOutput {
            routings: Vec::new(),
            ..ran
        };
        none.fill(&b, &bare, 0, &step).unwrap();
        let back = none.to_host(&b, []).unwrap();
        assert!(back.expert_counts.is_empty() && back.summaries.is_empty());
    }

    #[test]
    fn summaries_of_the_rows_asked_for_come_back_with_the_counts() {
        let b = CpuBackend;
        let rows = [[0.0, 3.0, 1.0], [2.0, -1.0, 0.5], [0.0, 0.0, 9.0]];
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let ran = DeviceOutput::<CpuBackend> {
            logits: b.tensor_from_host(flat, 3, 3).unwrap(),
            routings: Vec::new(),
        };
        let step = prefill_step(&b, 3);
        // Room for four rows; the step summarises its three.
        let mut results = StepResults::<CpuBackend>::new(&b, &[], 4).unwrap();
        results.fill(&b, &ran, 3, &step).unwrap();
        let back = results.to_host(&b, [2, 0]).unwrap();
        let want: Vec<RowSummary> = [2, 0]
            .iter()
            .map(|&r| RowSummary::of(&rows[r]).unwrap())
            .collect();
        assert_eq!(back.summaries, want);
        assert_eq!(back.summaries[0].argmax, 2);
        // A row past those summarised is an error naming it, not a wrong summary.
        let err = results.to_host(&b, [5]).err().unwrap();
        assert!(err.to_string().contains("row 5"), "{err}");
    }
}
