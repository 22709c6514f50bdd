//! The `--device`, `--gpu-memory-utilization`, CUDA graph and kernel-choice flags, shared by every
//! command that runs the model (`generate`, `serve`, `coordinator`, `worker`).

use clap::Args;
use tessera_worker::device::{
    DEFAULT_GPU_MEMORY_UTILIZATION, DeviceConfig, DeviceKind, MoeKernels, PrefillAttention,
};

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where the model runs: `auto` (a GPU when one and the CUDA libraries are present, else the
    /// CPU), `cpu`, `cuda` (the GPU picked by the worker's local rank) or `cuda:N` (GPU N).
    /// Launched workers inherit it. The chosen device is logged and reported by GetModelInfo.
    #[arg(long, default_value = "auto", env = "TESSERA_DEVICE")]
    pub device: DeviceKind,
    /// Share of each GPU's memory a process may fill: weights, KV cache and activations. The KV
    /// cache gets what is free after the weights less the rest of the GPU (vLLM's rule), unless
    /// --kv-cache-mib says otherwise. In (0, 1]; ignored on the CPU.
    #[arg(long, default_value_t = DEFAULT_GPU_MEMORY_UTILIZATION, env = "TESSERA_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: f32,
    /// Largest decode batch replayed from a CUDA graph: decode steps are padded to a batch
    /// bucket (1, 2, 4, 8, then multiples of 8) and replayed with one launch instead of hundreds,
    /// each shape captured on its second step. 0 runs every step eagerly, as --enforce-eager
    /// does. Launched workers inherit it; ignored on the CPU.
    #[arg(long, default_value_t = tessera_worker::graphs::DEFAULT_MAX_BATCH, env = "TESSERA_CUDA_GRAPH_MAX_BATCH")]
    pub cuda_graph_max_batch: usize,
    /// Launch every step's kernels one by one, never from a CUDA graph (vLLM's flag of the same
    /// name; the same as --cuda-graph-max-batch 0).
    #[arg(long, env = "TESSERA_ENFORCE_EAGER")]
    pub enforce_eager: bool,
    /// Attention kernels of prompt steps on a GPU: `tensor-cores` (tiles of up to 64 tokens of a
    /// sequence per block, multiplied on the tensor cores; taken where a step averages 8 or more
    /// tokens per sequence tile, the heads are at most 192 (keys) and 128 (values) wide, and the
    /// GPU is Ampere or newer) or `paged` (the decode kernels, a block per token, for every step:
    /// slower for long prompts, a fallback). Launched workers inherit it; ignored on the CPU.
    #[arg(long, default_value_t = PrefillAttention::TensorCores, env = "TESSERA_PREFILL_ATTENTION")]
    pub prefill_attention: PrefillAttention,
    /// Kernels of MoE steps with many tokens per expert (prefill) on a GPU: `tensor-cores` (the
    /// grouped tensor-core kernels, 64 routed tokens of one expert per tile, no copy to the host;
    /// on Ampere or newer) or `cublas` (the per-expert offsets copied to the host, then cuBLAS
    /// products per active expert, a fallback). Decode-sized steps always take the grouped SIMT
    /// kernels. Launched workers inherit it; ignored on the CPU.
    #[arg(long, default_value_t = MoeKernels::TensorCores, env = "TESSERA_MOE_KERNELS")]
    pub moe_kernels: MoeKernels,
}

impl DeviceArgs {
    /// The settings of a process that is rank `local_rank` among its host's workers.
    pub fn config(&self, local_rank: usize) -> DeviceConfig {
        DeviceConfig {
            kind: self.device,
            gpu_memory_utilization: self.gpu_memory_utilization,
            local_rank,
            cuda_graph_max_batch: if self.enforce_eager {
                0
            } else {
                self.cuda_graph_max_batch
            },
            prefill_attention: self.prefill_attention,
            moe_kernels: self.moe_kernels,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use tessera_worker::graphs::DEFAULT_MAX_BATCH;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        device: DeviceArgs,
    }

    fn graphs(args: &[&str]) -> usize {
        let argv = std::iter::once("tessera").chain(args.iter().copied());
        Cli::parse_from(argv).device.config(0).cuda_graph_max_batch
    }

    #[test]
    fn enforce_eager_turns_decode_graphs_off() {
        assert_eq!(graphs(&[]), DEFAULT_MAX_BATCH);
        assert_eq!(graphs(&["--cuda-graph-max-batch", "16"]), 16);
        assert_eq!(
            graphs(&["--cuda-graph-max-batch", "16", "--enforce-eager"]),
            0
        );
        assert_eq!(graphs(&["--cuda-graph-max-batch", "0"]), 0);
    }

    #[test]
    fn kernel_choices_default_to_the_tensor_cores() {
        let config = |args: &[&str]| {
            let argv = std::iter::once("tessera").chain(args.iter().copied());
            Cli::try_parse_from(argv).map(|c| c.device.config(0))
        };
        let defaults = config(&[]).unwrap();
        assert_eq!(defaults.prefill_attention, PrefillAttention::TensorCores);
        assert_eq!(defaults.moe_kernels, MoeKernels::TensorCores);
        let fallbacks = config(&["--prefill-attention", "paged", "--moe-kernels", "cublas"]);
        let fallbacks = fallbacks.unwrap();
        assert_eq!(fallbacks.prefill_attention, PrefillAttention::Paged);
        assert_eq!(fallbacks.moe_kernels, MoeKernels::Cublas);
        let err = config(&["--prefill-attention", "flash"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("flash") && err.contains("paged"), "{err}");
    }
}
