//! Fuzz target: OpenAI HTTP bodies through parsing, the chat template and ModelInfo::validate. The body is `tessera_coordinator::fuzz_targets::http_request`, which tests/fuzz_regressions.rs also runs on stable.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_coordinator::fuzz_targets::http_request(data));
