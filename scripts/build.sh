#!/usr/bin/env bash
# build.sh [BUILD_DIR] [extra cmake args...] — configure and build (Release, warnings as errors,
# CUDA on when nvcc is found). Quiet unless something fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"
shift || true
export PATH="$PATH:/usr/local/cuda/bin"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DIHIP_WERROR=ON "$@" >"$BUILD.configure.log" 2>&1 \
    || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j"$(nproc)" >"$BUILD.build.log" 2>&1 || { tail -50 "$BUILD.build.log"; exit 1; }
