/*
 * bench-util.h — small helpers shared by the GPU benchmark tools of tests/bench (header only).
 */
#ifndef BENCH_UTIL_H
#define BENCH_UTIL_H

#include <stdint.h>
#include <stdlib.h>

/* A size with an optional K or M suffix (×1024, ×1048576); *end is left after it. */
static inline int64_t parse_size(const char *s, char **end)
{
    long long v = strtoll(s, end, 10);
    if (**end == 'K' || **end == 'k') {
        v *= 1024;
        (*end)++;
    } else if (**end == 'M' || **end == 'm') {
        v *= 1048576;
        (*end)++;
    }
    return v;
}

#endif /* BENCH_UTIL_H */
