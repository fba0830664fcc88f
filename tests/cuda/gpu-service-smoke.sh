#!/usr/bin/env bash
# gpu-service-smoke.sh — the service on one GPU (issue 7), run on the lent H200:
#   a prefill worker with --device cuda creating a bf16 segment and writing every prompt's blocks
#   into it from the GPU; two decode workers on the same segment, --device cuda (blocks read in
#   place over PCIe + GPU page caches) and --device cpu (blocks loaded into the CPU engine); the
#   same greedy chats through both (a short prompt, and a ~3000-token one so HiP prunes and the
#   offloaded pages matter; the GPU worker with its stage-0 probe cache on). Prints both answers and whether they are equal, and the GPU worker's
#   gpu.* metrics.
# Binaries and their shared libraries come from $IHIP_SVC (default .gpucarry/svc: bin/ and lib/,
# see tests/cuda/README.md); the model from $IHIP_MODEL. Logs go to $OUT.
set -u
OUT="${OUT:-/tmp/ihip-out}"
mkdir -p "$OUT"
S="${IHIP_SVC:-.gpucarry/svc}"
B="$S/bin"
export LD_LIBRARY_PATH="$PWD/$S/lib:${LD_LIBRARY_PATH:-}"
M="${IHIP_MODEL:-models/SmolLM2-135M-Instruct-Q4_1.gguf}"
D="$(mktemp -d /dev/shm/ihip-smoke.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$D"
}
trap cleanup EXIT

"$B/ihip-prefill-worker" --model "$M" --listen 127.0.0.1:50061 --kv-dir "$D" --kv-name g \
    --kv-create --device cuda 2>"$OUT/prefill.log" &
pids+=($!)
if ! "$B/ihip" health --addr 127.0.0.1:50061 --timeout-ms 90000; then
    echo "prefill worker did not start:"; tail -20 "$OUT/prefill.log"; exit 1
fi
for dev in cuda cpu; do
    port=$([ "$dev" = cuda ] && echo 50051 || echo 50052)
    "$B/ihip-decode-worker" --model "$M" --listen "127.0.0.1:$port" --prefill 127.0.0.1:50061 \
        --kv-dir "$D" --kv-name g --device "$dev" $([ "$dev" = cuda ] && echo --gpu-probe-cache-tokens 8192) \
        2>"$OUT/decode-$dev.log" &
    pids+=($!)
done
for port in 50051 50052; do
    if ! "$B/ihip" health --addr "127.0.0.1:$port" --timeout-ms 90000; then
        echo "decode worker on $port did not start:"; tail -20 "$OUT"/decode-*.log; exit 1
    fi
done

long="$OUT/long-prompt.txt"
: >"$long"
for i in $(seq 1 60); do
    echo "Paragraph $i. The archive of the northern library keeps records of every ship that" \
         "entered the harbour, its cargo, its captain and the weather on the day it arrived." >>"$long"
done
echo "The secret code word is BLUEBERRY-42. Remember it." >>"$long"
for i in $(seq 61 100); do
    echo "Paragraph $i. The archive of the northern library keeps records of every ship that" \
         "entered the harbour, its cargo, its captain and the weather on the day it arrived." >>"$long"
done
echo "Question: what is the secret code word? Answer with the code word only." >>"$long"

rc=0
for case in short long; do
    for port in 50051 50052; do
        if [ "$case" = short ]; then
            "$B/ihip" chat --addr "127.0.0.1:$port" -p "What is the capital of France? Answer in one sentence." \
                -n 32 --temp 0 --timeout-ms 120000 >"$OUT/chat-$case-$port.txt" 2>&1
        else
            "$B/ihip" chat --addr "127.0.0.1:$port" -f "$long" -n 24 --temp 0 --timeout-ms 300000 \
                >"$OUT/chat-$case-$port.txt" 2>&1
        fi
        echo "[$case, $([ $port = 50051 ] && echo 'decode --device cuda' || echo 'decode --device cpu'), rc $?]"
        cat "$OUT/chat-$case-$port.txt"; echo
    done
    # the answers without the progress and the stats line (timings, request ids differ)
    for port in 50051 50052; do
        tr '\r' '\n' <"$OUT/chat-$case-$port.txt" | grep -v -E '^ihip chat: ' |
            sed -E 's/^prefill: [0-9]+ \/ [0-9]+ tokens \([0-9]+ cached\)//' | grep -v '^$' \
            >"$OUT/answer-$case-$port.txt"
    done
    if cmp -s "$OUT/answer-$case-50051.txt" "$OUT/answer-$case-50052.txt"; then
        echo "== $case: GPU and CPU decode answers are EQUAL"
    else
        echo "== $case: GPU and CPU decode answers DIFFER"; rc=1
    fi
done
grep -E "GPU|cuda|device" "$OUT/prefill.log" | tail -5
grep -E "GPU|cuda|device|error" "$OUT/decode-cuda.log" | tail -8
exit $rc
