//! Fuzz target: config.json bytes (model config and generation config). The body is `tessera_common::fuzz_targets::model_config`, which tests/fuzz_regressions.rs also runs on stable.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_common::fuzz_targets::model_config(data));
