#!/usr/bin/env bash
# run-device.sh MODE... — what one call on the lent H200 runs (see tests/cuda/README.md).
#   kernels  the CUDA tests (test-cuda-attn, test-cuda-mask, test-cuda-model) and test-tensor
#   bench    tests/bench/attention_gpu and the PyTorch SDPA baseline in the same call
#   model    assemble models/ from parts carried in .gpucarry/ (see README) and run test-cuda-model
#   stash    keep the carried model parts outside the tree for the next call on the same machine
# Binaries come from $IHIP_GPU_BUILD (default build-gpu; built here with IHIP_SERVICE=OFF when
# missing). Logs go to $OUT (or /tmp/ihip-out); a summary table is printed last.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/ihip-out}"; mkdir -p "$OUT"
B="${IHIP_GPU_BUILD:-build-gpu}"
MODEL=models/SmolLM2-135M-Instruct-Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export IHIP_MODEL="$ROOT/$MODEL" IHIP_SRC="$ROOT"
summary=()
note() { summary+=("$1"); }

need_build() {
    for t in "$@"; do [ -x "$B/bin/$t" ] || return 0; done
    return 1
}
build() {
    if need_build "$@"; then
        echo "== building $* in $B"
        cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DIHIP_SERVICE=OFF -DIHIP_CUDA=ON \
            >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
        cmake --build "$B" -j"$(nproc)" --target "$@" >"$OUT/build.log" 2>&1 \
            || { tail -60 "$OUT/build.log"; exit 1; }
    fi
}
run() { # name timeout cmd...
    local name="$1" lim="$2"; shift 2
    local t0=$(date +%s.%N)
    timeout "$lim" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local dt; dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')
    tail -25 "$OUT/$name.log"
    note "$(printf '%-22s rc=%-3s %6.1fs  %s' "$name" "$rc" "$dt" "$(grep -E 'PASS|FAIL' "$OUT/$name.log" | tail -1 | cut -c1-70)")"
}

nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for mode in "$@"; do
    case "$mode" in
    stash)
        mkdir -p /root/ihip-stash && cp .gpucarry/model.part* /root/ihip-stash/ 2>/dev/null
        ls -la /root/ihip-stash ;;
    model)
        if [ ! -f "$MODEL" ]; then
            mkdir -p models
            parts=$(for f in /root/ihip-stash/model.part* .gpucarry/model.part*; do
                [ -f "$f" ] && echo "$(basename "$f") $f"; done | sort -u -k1,1 | awk '{print $2}')
            # shellcheck disable=SC2086
            cat $parts >"$MODEL.tmp"
            if echo "$SHA  $MODEL.tmp" | sha256sum -c --quiet; then mv "$MODEL.tmp" "$MODEL"; else
                echo "model parts do not assemble (sha mismatch)"; ls -la /root/ihip-stash .gpucarry; rm -f "$MODEL.tmp"; fi
        fi
        build test-cuda-model
        run test-cuda-model 300 "$B/bin/test-cuda-model" ;;
    kernels)
        build test-cuda-attn test-cuda-mask test-cuda-model test-tensor
        run test-cuda-attn 240 "$B/bin/test-cuda-attn"
        run test-cuda-mask 240 "$B/bin/test-cuda-mask" ${MASK_ARGS:-}
        run test-cuda-model 240 "$B/bin/test-cuda-model"
        run test-tensor 120 "$B/bin/test-tensor" ;;
    bench)
        build attention_gpu
        run attention_gpu 420 "$B/bin/attention_gpu" --csv "$OUT/attention_gpu.csv" ${BENCH_ARGS:-}
        PYTHONUNBUFFERED=1 run attention_torch 240 python3 tests/bench/attention_gpu_torch.py --csv "$OUT/attention_torch.csv" ${TORCH_ARGS:-} ;;
    *) echo "unknown mode $mode"; exit 2 ;;
    esac
done
echo; echo "== summary"; printf '%s\n' "${summary[@]}"
