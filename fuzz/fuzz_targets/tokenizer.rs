//! Fuzz target: text and token ids through the tokenizer, the incremental decoder and stop strings. The body is `tessera_coordinator::fuzz_targets::tokenizer_input`, which tests/fuzz_regressions.rs also runs on stable.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_coordinator::fuzz_targets::tokenizer_input(data));
