//! Fuzz target: a safetensors file's bytes (header, offsets, slices). The body is `tessera_worker::checkpoint::fuzz_targets::safetensors_header`, which tests/fuzz_regressions.rs also runs on stable.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_worker::checkpoint::fuzz_targets::safetensors_header(data)
});
