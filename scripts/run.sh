#!/usr/bin/env bash
# run.sh [QUESTION] — set up everything (packages, venv, model), build, and stream a chat
# answer from the real model with `ihip generate`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh" "$ROOT/build"
exec "$ROOT/build/bin/ihip" generate -m "$ROOT/models/SmolLM2-135M-Instruct-Q4_1.gguf" --chat \
    -p "${1:-What is the capital of France? Answer in one sentence.}" -n 256 --temp 0.7
