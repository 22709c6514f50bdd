#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time: `bash fuzz/run.sh [SECONDS] [TARGET...]`
# (default 60 s each, all targets). Needs a nightly toolchain (`rustup toolchain install
# nightly`); installs cargo-fuzz if it is missing. Each target starts from its checked-in seeds
# and past crashes (fuzz/seeds/<target>, fuzz/regressions/<target>) plus the working corpus
# fuzz/corpus/<target> (not committed). Crash, timeout and OOM artifacts are copied into
# fuzz/regressions/<target>/, where tests/fuzz_regressions.rs runs them on stable Rust: fix the
# bug, then commit the file.
#
# Environment: FUZZ_SANITIZER (default address; `none` builds and runs faster), FUZZ_JOBS
# (parallel fuzzing processes per target, default 1), FUZZ_RSS_MB (memory limit, default 2048).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
shift || true
all_targets=(config safetensors_header safetensors_index http_request tokenizer)
targets=("$@")
((${#targets[@]})) || targets=("${all_targets[@]}")

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz/run.sh needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# -a: debug assertions and overflow checks, so arithmetic overflow is a finding, as in tests.
build_flags=(--sanitizer "${FUZZ_SANITIZER:-address}" --debug-assertions)
found=()
# -jobs sends each job's output to fuzz-N.log; only ask for it when running several.
jobs=()
if ((${FUZZ_JOBS:-1} > 1)); then
    jobs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
fi
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "regressions/$target" "artifacts/$target"
    echo "== $target: ${seconds}s"
    before=$(find "artifacts/$target" -type f | sort)
    status=0
    # Seeds and regressions are read-only extra corpus dirs; new inputs go to corpus/<target>.
    cargo +nightly fuzz run "${build_flags[@]}" "$target" \
        "corpus/$target" "seeds/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb="${FUZZ_RSS_MB:-2048}" -timeout=10 \
        "${jobs[@]}" -print_final_stats=1 || status=$?
    after=$(find "artifacts/$target" -type f | sort)
    new=$(comm -13 <(echo "$before") <(echo "$after") | grep -v '^$' || true)
    for file in $new; do
        cp "$file" "regressions/$target/"
        found+=("regressions/$target/$(basename "$file")")
    done
    if ((status != 0)) && [ -z "$new" ]; then
        echo "cargo fuzz run $target failed (exit $status) without leaving an artifact" >&2
        exit "$status"
    fi
done

if ((${#found[@]})); then
    echo
    echo "The fuzzers found ${#found[@]} failing input(s), copied to:"
    printf '  fuzz/%s\n' "${found[@]}"
    echo "Reproduce with: cargo +nightly fuzz run TARGET fuzz/regressions/TARGET/FILE"
    echo "Fix the bug, check that \`cargo nextest run --test fuzz_regressions\` passes, then add"
    echo "and commit these files: they are now regression tests."
    exit 1
fi
echo "no crashes"
