#!/bin/sh
# run-fuzz.sh BINARY CORPUS_DIR WORK_DIR — run a libFuzzer target for a bounded time.
#
# The seed corpus is copied into WORK_DIR/corpus so the fuzzer's new inputs never land in the
# source tree. Runs for $IHIP_FUZZ_SECONDS (default 60) seconds with -max_len=65536 and
# -rss_limit_mb=2048; crash, leak, timeout and OOM inputs are written to WORK_DIR/artifacts/.
# Exits 0 if nothing was found, non-zero otherwise.
set -u

if [ $# -ne 3 ]; then
    echo "usage: $0 BINARY CORPUS_DIR WORK_DIR" >&2
    exit 2
fi
bin=$1
seeds=$2
work=$3
secs=${IHIP_FUZZ_SECONDS:-60}

if [ ! -x "$bin" ]; then
    echo "run-fuzz: $bin is not an executable" >&2
    exit 2
fi
mkdir -p "$work/corpus" "$work/artifacts" || exit 2
if [ -d "$seeds" ]; then
    cp -f "$seeds"/* "$work/corpus/" 2>/dev/null || true
fi
rm -f "$work"/artifacts/crash-* "$work"/artifacts/leak-* "$work"/artifacts/timeout-* \
      "$work"/artifacts/oom-*

echo "run-fuzz: $bin for ${secs}s, corpus $work/corpus ($(ls "$work/corpus" | wc -l) inputs)"
"$bin" "$work/corpus" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=30 \
    -artifact_prefix="$work/artifacts/" -print_final_stats=1
rc=$?

found=$(ls "$work"/artifacts/ 2>/dev/null | grep -E '^(crash|leak|timeout|oom)-' | head -n 20)
if [ $rc -ne 0 ] || [ -n "$found" ]; then
    echo "run-fuzz: FAILED (exit $rc); reproducers in $work/artifacts/:" >&2
    [ -n "$found" ] && echo "$found" >&2
    exit 1 # not libFuzzer's 77, which a test runner could take for "skipped"
fi
echo "run-fuzz: no crash in ${secs}s"
exit 0
