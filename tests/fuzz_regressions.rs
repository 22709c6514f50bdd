//! The cargo-fuzz targets (`fuzz/`) on stable Rust: each target's body is fed its seeds
//! (`fuzz/seeds/<target>/`), every input the fuzzer ever crashed on (`fuzz/regressions/<target>/`,
//! where `fuzz/run.sh` copies new crash artifacts), and a few thousand deterministic mutations of
//! them. So a crash found by fuzzing on nightly stays a test in CI, which has no nightly.
//!
//! A failing input is written to `target/fuzz-failures/<target>/` and named in the panic message;
//! after fixing the bug, move it into `fuzz/regressions/<target>/` and commit it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Mutated inputs per target, on top of the checked-in ones.
const MUTANTS: usize = 3000;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted (a missing folder is empty).
fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.display().to_string(), bytes)
        })
        .collect();
    out.sort();
    out
}

/// xorshift64*: deterministic, so a failure reproduces on every run and machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Numbers that break arithmetic: zero, negatives, the edges of integer types, huge floats.
const INTERESTING: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "255",
    "65536",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "-1e308",
    "0.5",
    "NaN",
    "null",
    "\"\"",
    "[]",
    "{}",
];

/// One to four mutations of `input`, some splicing in `other`: byte flips, insertions and
/// deletions, a number or token swapped for an interesting one, cuts and duplications, and the
/// 8-byte little-endian length of a safetensors header rewritten.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below(16.min(v.len() - i));
                v.drain(i..i + n);
            }
            3 => {
                // Replace a run of digits (or any position) with an interesting token.
                let digits: Vec<usize> = (0..v.len()).filter(|i| v[*i].is_ascii_digit()).collect();
                let at = if digits.is_empty() {
                    rng.below(v.len() + 1)
                } else {
                    digits[rng.below(digits.len())]
                };
                let mut end = at;
                while end < v.len() && (v[end].is_ascii_digit() || v[end] == b'.') {
                    end += 1;
                }
                let token = INTERESTING[rng.below(INTERESTING.len())].as_bytes();
                v.splice(at..end, token.iter().copied());
            }
            4 => v.truncate(rng.below(v.len() + 1)),
            5 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below(32.min(v.len() - i));
                let chunk = v[i..i + n].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            6 if !other.is_empty() => {
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            7 if v.len() >= 8 => {
                let len = match rng.below(4) {
                    0 => u64::MAX,
                    1 => (v.len() as u64).wrapping_sub(rng.below(16) as u64),
                    2 => rng.below(v.len() + 16) as u64,
                    _ => 100_000_001,
                };
                v[..8].copy_from_slice(&len.to_le_bytes());
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

/// Runs `body` over the checked-in inputs of `target` and their mutants; fails naming the
/// first input that panics.
fn run(target: &str, body: fn(&[u8])) {
    let mut fixed = inputs("regressions", target);
    fixed.extend(inputs("seeds", target));
    assert!(
        !fixed.is_empty(),
        "fuzz/seeds/{target}/ and fuzz/regressions/{target}/ are empty"
    );
    let mut rng = Rng(0x7e55_e7a0_f022_0001 ^ target.len() as u64);
    let mut all: Vec<(String, Vec<u8>)> = fixed.clone();
    for i in 0..MUTANTS {
        let (name, base) = &fixed[rng.below(fixed.len())];
        let (_, other) = &fixed[rng.below(fixed.len())];
        all.push((
            format!("mutant {i} of {name}"),
            mutate(&mut rng, base, other),
        ));
    }
    // The default hook would print every caught panic; one report (below) is enough.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let failure = all.iter().find_map(|(name, data)| {
        catch_unwind(AssertUnwindSafe(|| body(data)))
            .err()
            .map(|e| (name, data, e))
    });
    std::panic::set_hook(hook);
    if let Some((name, data, e)) = failure {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/fuzz-failures")
            .join(target);
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("failure-{}", data.len()));
        let _ = std::fs::write(&path, data);
        panic!(
            "fuzz target `{target}` panicked on {name} ({} bytes, saved to {}): {msg}\n\
             input (lossy): {:?}\n\
             fix it, then move the file into fuzz/regressions/{target}/ and commit it",
            data.len(),
            path.display(),
            String::from_utf8_lossy(data)
        );
    }
}

#[test]
fn config() {
    run("config", tessera_common::fuzz_targets::model_config);
}

#[test]
fn safetensors_header() {
    run(
        "safetensors_header",
        tessera_worker::checkpoint::fuzz_targets::safetensors_header,
    );
}

#[test]
fn safetensors_index() {
    run(
        "safetensors_index",
        tessera_worker::checkpoint::fuzz_targets::safetensors_index,
    );
}

#[test]
fn http_request() {
    run(
        "http_request",
        tessera_coordinator::fuzz_targets::http_request,
    );
}

#[test]
fn tokenizer() {
    run(
        "tokenizer",
        tessera_coordinator::fuzz_targets::tokenizer_input,
    );
}
