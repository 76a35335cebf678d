#!/usr/bin/env bash
# Sets up .venv, then serves the default model on a local cluster (Ctrl-C stops every node).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/expertmesh launch --config configs/local.yaml "$@"
