#!/usr/bin/env bash
# The project's test command (README, and .ci/run calls it): installs what the tests need on a fresh
# machine, checks formatting and lints, then runs every test once.
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything the tests need beyond Rust itself. (Today: nothing; etcd-server and prometheus join
# here with the cluster and operations issues.)
need_apt=()
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
    fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi
