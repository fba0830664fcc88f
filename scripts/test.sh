#!/usr/bin/env bash
# test.sh — set up, build, and run every test:
#   1. the Release build (warnings are errors; CUDA compiled when nvcc is present): all ctest
#      tests (C unit tests, Python tests against llama-cpp-python and gguf);
#   2. an AddressSanitizer + UBSan build: the C unit tests again;
#   3. a libFuzzer build (clang): each fuzz target for IHIP_FUZZ_SECONDS (default 60) seconds.
# Ends with one line "N passed, N failed" over all three.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh" || exit 1
J="$(nproc)"
passed=0; failed=0; skipped=0
count() { # parse ctest's "N% tests passed, F tests failed out of T" (skipped tests count as
          # passed there: they are counted apart, e.g. the CUDA tests on a machine without a GPU)
    local log="$1" line t f s
    line="$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -1)"
    if [ -z "$line" ]; then failed=$((failed + 1)); return; fi
    f="$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")"
    t="$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\2/' <<<"$line")"
    s="$(grep -cE '\*\*\*Skipped' "$log")"
    passed=$((passed + t - f - s)); failed=$((failed + f)); skipped=$((skipped + s))
}

echo "== release build"
if "$ROOT/scripts/build.sh" "$ROOT/build"; then
    (cd build && ctest -j"$J" --output-on-failure --timeout 900) 2>&1 | tee build/ctest.log
    count build/ctest.log
else
    failed=$((failed + 1))
fi

echo "== asan+ubsan build (unit tests)"
if "$ROOT/scripts/build.sh" "$ROOT/build-asan" -DIHIP_CUDA=OFF -DIHIP_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo; then
    (cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        ctest -j"$J" --output-on-failure -R '^(unit|kvstore)/' --timeout 900) 2>&1 | tee build-asan/ctest.log
    count build-asan/ctest.log
else
    failed=$((failed + 1))
fi

echo "== fuzz build (libFuzzer, ${IHIP_FUZZ_SECONDS:-60} s per target)"
if CC=clang CXX=clang++ "$ROOT/scripts/build.sh" "$ROOT/build-fuzz" -DIHIP_CUDA=OFF -DIHIP_FUZZ=ON -DIHIP_WERROR=OFF; then
    (cd build-fuzz && ctest --output-on-failure -R '^fuzz/' --timeout 900) 2>&1 | tee build-fuzz/ctest.log
    count build-fuzz/ctest.log
else
    failed=$((failed + 1))
fi

[ "$skipped" -gt 0 ] && echo "${skipped} skipped (their reason is in the logs above, e.g. no GPU)"
echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
