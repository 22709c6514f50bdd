#!/usr/bin/env bash
# Soak test: `bash tests/soak.sh [MINUTES]` (default 10) runs tests/soak.rs for that long against a
# release build: load with random cancellations and one worker SIGKILL, then checks every stream
# got exactly one terminal event, nothing is left running, and the coordinator's memory is flat.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
TESSERA_SOAK_SECS=$((minutes * 60)) cargo test --release --locked --test soak -- --nocapture
