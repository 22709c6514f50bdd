//! Fuzz target: model.safetensors.index.json bytes. The body is `tessera_worker::checkpoint::fuzz_targets::safetensors_index`, which tests/fuzz_regressions.rs also runs on stable.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_worker::checkpoint::fuzz_targets::safetensors_index(data)
});
