#!/usr/bin/env bash
# Renders and validates everything under deploy/ offline: the kustomize base, overlays and
# components against Kubernetes' JSON schemas (and vendored subsets of the prometheus-operator
# CRDs), the Grafana dashboard against common/src/metrics.rs, and the Dockerfile with hadolint.
# See deploy/validate.py for the checks. Fails on any problem.
#
# Tools come from PyPI only (deploy/requirements.txt), installed once into a venv under
# $TESSERA_DEPLOY_VENV (default ~/.cache/tessera/deploy-venv) and reinstalled when the pins change.
# With TESSERA_BIN (or --tessera-bin) pointing at a tessera binary, container flags and TESSERA_*
# settings are also checked against its --help.
#
#   bash deploy/validate.sh [--tessera-bin target/debug/tessera]
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TESSERA_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera/deploy-venv}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum deploy/requirements.txt | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        # Debian splits venv/ensurepip out of python3.
        sudo_=(); [ "$(id -u)" = 0 ] || sudo_=(sudo)
        "${sudo_[@]}" apt-get update -qq
        "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
    fi
    echo "installing deploy validation tools into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r deploy/requirements.txt
    echo "$want" > "$stamp"
fi

args=("$@")
if [ -n "${TESSERA_BIN:-}" ]; then
    if [ -x "$TESSERA_BIN" ]; then
        args+=(--tessera-bin "$TESSERA_BIN")
    else
        echo "note: TESSERA_BIN=$TESSERA_BIN is not an executable; flags not checked"
    fi
fi
PATH="$venv/bin:$PATH" exec "$venv/bin/python" deploy/validate.py "${args[@]}"
