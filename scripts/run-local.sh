#!/usr/bin/env bash
# run-local.sh [QUESTION] — the local stack on this machine: set up and build, create the KV
# segment, start one prefill worker and one decode worker on the real model, wait until both are
# SERVING, stream an answer with the C client `ihip chat`, then stop both workers.
#   run-local.sh --serve     keep the stack running (decode worker on $IHIP_DECODE_ADDR) until Ctrl-C
# Environment: IHIP_DECODE_ADDR (127.0.0.1:50051), IHIP_PREFILL_ADDR (127.0.0.1:50061),
# IHIP_KV_DIR (/dev/shm), IHIP_KV_NAME (ihip-local), IHIP_KEEP_SEGMENT=1 keeps the segment at exit.
# Worker logs: build/local/prefill.log, build/local/decode.log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh" "$ROOT/build"
B="$ROOT/build/bin"
MODEL="$ROOT/models/SmolLM2-135M-Instruct-Q4_1.gguf"
DECODE="${IHIP_DECODE_ADDR:-127.0.0.1:50051}"
PREFILL="${IHIP_PREFILL_ADDR:-127.0.0.1:50061}"
KV_DIR="${IHIP_KV_DIR:-/dev/shm}"
KV_NAME="${IHIP_KV_NAME:-ihip-local}"
LOGS="$ROOT/build/local"
mkdir -p "$LOGS"

pids=()
stop() {
    # SIGTERM: streams end with a status, leases are released, then the segment goes
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${IHIP_KEEP_SEGMENT:-0}" != 1 ]; then
        "$B/ihip-kv" destroy "$KV_NAME" --dir "$KV_DIR" >/dev/null 2>&1 || true
    fi
}
trap stop EXIT
trap 'exit 130' INT TERM

"$B/ihip-prefill-worker" --model "$MODEL" --listen "$PREFILL" --kv-dir "$KV_DIR" --kv-name "$KV_NAME" \
    --kv-create >"$LOGS/prefill.log" 2>&1 &
pids+=($!)
"$B/ihip" health --addr "$PREFILL" --timeout-ms 120000 >/dev/null \
    || { echo "run-local: the prefill worker did not become SERVING; see $LOGS/prefill.log" >&2; exit 1; }
"$B/ihip-decode-worker" --model "$MODEL" --listen "$DECODE" --prefill "$PREFILL" --kv-dir "$KV_DIR" \
    --kv-name "$KV_NAME" >"$LOGS/decode.log" 2>&1 &
pids+=($!)
"$B/ihip" health --addr "$DECODE" --timeout-ms 120000 >/dev/null \
    || { echo "run-local: the decode worker did not become SERVING; see $LOGS/decode.log" >&2; exit 1; }

if [ "${1:-}" = "--serve" ]; then
    echo "run-local: serving infinitehip.v1.Generator on $DECODE (prefill worker $PREFILL); Ctrl-C stops" >&2
    wait
else
    "$B/ihip" chat --addr "$DECODE" -p "${1:-What is the capital of France? Answer in one sentence.}" \
        -n 256 --temp 0.7
fi
