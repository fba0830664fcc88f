/*
 * fuzz-gguf.c — libFuzzer target for the GGUF reader.
 *
 * Opens the input with gguf_open_mem; when it opens, touches everything the reader promises
 * is inside the buffer (every key, every scalar, every array element and string byte, the
 * first and last byte of every tensor's data), checks the lookups find what kv_at/tensor_at
 * give, and runs gguf_print_info (text and JSON) to /dev/null, and once more into memory to
 * check the JSON parses. ASan/UBSan turn any read
 * outside the input or any undefined behaviour into a crash. The input is copied to an
 * exact-size heap buffer first so ASan's redzone sits right after its last byte.
 *
 * Build: clang -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -mavx2 -mfma -mf16c
 *        -Icommon tests/fuzz/fuzz-gguf.c common/gguf/\*.c common/base/\*.c common/tensor/\*.c
 *        -o fuzz-gguf -lm -lpthread
 * Run:   tests/fuzz/run-fuzz.sh ./fuzz-gguf tests/fuzz/corpus/fuzz-gguf /tmp/fuzz-work
 */
#define _POSIX_C_SOURCE 200809L
#include "gguf/gguf.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#include "../common/json-check.h"

static FILE *devnull;
static volatile uint64_t sink; /* keeps the touched bytes from being optimised away */

static void touch(const void *p, uint64_t n)
{
    const volatile uint8_t *b = p;
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i++)
        acc += b[i];
    sink += acc;
}

static void walk(const gguf_file *f)
{
    static const uint64_t esz[GGUF_VT_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        const gguf_kv *kv = gguf_kv_at(f, i);
        if (!kv || kv->key.len == 0) abort();
        touch(kv->key.ptr, kv->key.len);
        /* A lookup by the key (as a C string, when it has no NUL) finds the first key with
         * that name, which must be this one: duplicates are rejected. */
        if (kv->key.len < 4096 && !memchr(kv->key.ptr, 0, kv->key.len)) {
            char buf[4096];
            memcpy(buf, kv->key.ptr, kv->key.len);
            buf[kv->key.len] = '\0';
            if (gguf_find_kv(f, buf) != kv) abort();
        }
        if (kv->type == GGUF_VT_STRING) {
            touch(kv->arr_strs[0].ptr, kv->arr_strs[0].len);
        } else if (kv->type == GGUF_VT_ARRAY) {
            if (kv->arr_type == GGUF_VT_STRING) {
                for (uint64_t j = 0; j < kv->arr_n; j++)
                    touch(kv->arr_strs[j].ptr, kv->arr_strs[j].len);
            } else {
                if (kv->arr_type >= GGUF_VT_COUNT || kv->arr_type == GGUF_VT_ARRAY) abort();
                touch(kv->data, kv->arr_n * esz[kv->arr_type]);
                for (uint64_t j = 0; j < kv->arr_n; j++) {
                    sink += (uint64_t)gguf_arr_i64(kv, j);
                    double d = gguf_arr_f64(kv, j);
                    sink += d == d;
                }
            }
        } else {
            if (kv->type >= GGUF_VT_COUNT) abort();
            touch(kv->data, esz[kv->type]);
        }
    }
    uint64_t align = gguf_alignment(f);
    if (align == 0 || (align & (align - 1))) abort();
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        if (!t || t->nbytes == 0 || t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS) abort();
        touch(t->name.ptr, t->name.len);
        const uint8_t *d = t->data;
        sink += d[0] + d[t->nbytes - 1];
        if (t->name.len < 4096 && !memchr(t->name.ptr, 0, t->name.len)) {
            char buf[4096];
            memcpy(buf, t->name.ptr, t->name.len);
            buf[t->name.len] = '\0';
            if (gguf_find_tensor(f, buf) != t) abort();
        }
    }
    /* A few getters on keys that the fuzzer may well produce. */
    static const char *const keys[] = {"general.alignment", "a", "k", "general.architecture"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        cm_err e;
        uint64_t u;
        int64_t s;
        double d;
        bool b;
        gguf_str str;
        uint32_t et;
        uint64_t n;
        const void *p;
        const gguf_str *strs;
        gguf_get_u64(f, keys[i], &u, &e);
        gguf_get_i64(f, keys[i], &s, &e);
        gguf_get_f64(f, keys[i], &d, &e);
        gguf_get_bool(f, keys[i], &b, &e);
        if (gguf_get_str(f, keys[i], &str, &e) == 0) touch(str.ptr, str.len);
        gguf_get_arr(f, keys[i], &et, &n, &p, &strs, &e);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!devnull) {
        devnull = fopen("/dev/null", "w");
        if (!devnull) abort();
    }
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    if (size) memcpy(copy, data, size);
    cm_err err;
    gguf_file *f = gguf_open_mem(copy, size, &err);
    if (f) {
        walk(f);
        gguf_print_info(f, devnull, false, true);
        gguf_print_info(f, devnull, true, true);
        /* The JSON must always parse (escaping of arbitrary bytes). */
        char *js = NULL;
        size_t len = 0;
        FILE *ms = open_memstream(&js, &len);
        if (ms) {
            gguf_print_info(f, ms, true, true);
            fclose(ms);
            if (!json_valid(js, len)) {
                fprintf(stderr, "invalid JSON from gguf_print_info:\n%.*s\n", (int)len, js);
                abort();
            }
            free(js);
        }
        gguf_close(f);
    } else if (err.code >= 0 || err.msg[0] == '\0') {
        abort(); /* a failure must come with a negative code and a message */
    }
    free(copy);
    return 0;
}
