//! Tessera's protobuf packages, generated at build time by protox + tonic-prost-build (no system
//! `protoc` needed). Packages are versioned: a breaking change adds `v2` beside `v1`.

pub mod codec;

/// The public API: generation and batch jobs.
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// Encoded descriptors of every package, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tessera_descriptor.bin"));

/// The worker control plane (shard assignment, steps, health and shutdown) and the registry
/// workers join when membership is static (no etcd).
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("tessera.worker.v1");
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::worker::v1::{SamplingParams, SequenceStep, StepRequest};

    #[test]
    fn step_requests_round_trip_and_keep_optional_presence() {
        let req = StepRequest {
            step_id: 7,
            seqs: vec![SequenceStep {
                seq_id: 1,
                token_ids: vec![5, 6],
                context_len: 2,
                block_table: vec![3],
                sampling: Some(SamplingParams {
                    temperature: 0.0,
                    top_p: None,
                    seed: Some(0),
                    ..Default::default()
                }),
                top_logprobs: 2,
                prompt_logprobs: true,
                sample: true,
                prompt_len: 2,
            }],
        };
        let back = StepRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, req);
        let sampling = back.seqs[0].sampling.clone().unwrap();
        assert_eq!(sampling.seed, Some(0), "an explicit zero seed survives");
        assert_eq!(sampling.top_p, None, "an absent top_p stays absent");
    }
}
