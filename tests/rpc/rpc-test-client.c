/*
 * rpc-test-client.c — checks the client half of common/rpc (rpc_unary, rpc_stream_*) with exact
 * status semantics against a running rpc-test-server. Run by tests/rpc/test_rpc.py:
 *
 *   rpc-test-client HOST:PORT      (the server must run with --max-streams 4)
 *
 * Exit 0 when every check passes, 1 otherwise; prints "N passed, N failed" last.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "base/cm.h"
#include "infinitehip/v1/admin.pb-c.h"
#include "infinitehip/v1/generator.pb-c.h"
#include "rpc/rpc.h"

static int n_pass, n_fail;

static void check(const char *name, bool ok, const char *detail)
{
    if (ok)
        n_pass++, printf("ok   %s\n", name);
    else
        n_fail++, printf("FAIL %s %s\n", name, detail ? detail : "");
}

#define GEN "/infinitehip.v1.Generator/Generate"

/* Read a whole Generate stream: words concatenated into out; returns the final rc. */
static int read_all(rpc_stream *s, rpc_arena *a, char *out, size_t cap, int *n_pieces,
                    rpc_status *st)
{
    ProtobufCMessage *m;
    int rc;
    size_t len = 0;
    *n_pieces = 0;
    out[0] = 0;
    while ((rc = rpc_stream_read(s, &infinitehip__v1__generate_response__descriptor, a, &m, st)) ==
           1) {
        const Infinitehip__V1__GenerateResponse *r = (const Infinitehip__V1__GenerateResponse *)m;
        if (r->event_case == INFINITEHIP__V1__GENERATE_RESPONSE__EVENT_PIECE) {
            len += (size_t)snprintf(out + len, cap - len, "%s", r->piece->text);
            (*n_pieces)++;
        }
    }
    return rc;
}

/* GenerateStream: a header, two text chunks, close_send; then read the generation. */
static int upload(rpc_channel *ch, rpc_arena *a, char *text, size_t cap, rpc_status *st)
{
    rpc_stream *s = NULL;
    int n,
        rc = rpc_stream_open(&s, ch, "/infinitehip.v1.Generator/GenerateStream", NULL, 10000, st);
    Infinitehip__V1__GenerateRequest hdr = INFINITEHIP__V1__GENERATE_REQUEST__INIT;
    hdr.max_tokens = 4;
    Infinitehip__V1__GenerateStreamRequest sr = INFINITEHIP__V1__GENERATE_STREAM_REQUEST__INIT;
    sr.part_case = INFINITEHIP__V1__GENERATE_STREAM_REQUEST__PART_HEADER;
    sr.header = &hdr;
    if (rc == 0) rc = rpc_stream_write(s, &sr.base);
    Infinitehip__V1__PromptChunk pc = INFINITEHIP__V1__PROMPT_CHUNK__INIT;
    pc.data_case = INFINITEHIP__V1__PROMPT_CHUNK__DATA_TEXT;
    sr.part_case = INFINITEHIP__V1__GENERATE_STREAM_REQUEST__PART_CHUNK;
    sr.chunk = &pc;
    pc.text = (char *)(uintptr_t) "up ";
    if (rc == 0) rc = rpc_stream_write(s, &sr.base);
    pc.text = (char *)(uintptr_t) "load ";
    if (rc == 0) rc = rpc_stream_write(s, &sr.base);
    if (rc == 0) rc = rpc_stream_close_send(s);
    /* a failed write or close means the call ended: the read gives its status */
    if (s) rc = read_all(s, a, text, cap, &n, st);
    rpc_stream_free(s);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: rpc-test-client HOST:PORT\n");
        return 2;
    }
    rpc_channel *ch = NULL;
    cm_err err = {0};
    if (rpc_channel_open(&ch, argv[1], 0, &err) < 0) {
        printf("FAIL channel: %s\n0 passed, 1 failed\n", err.msg);
        return 1;
    }
    rpc_arena *a = rpc_arena_init(0);
    rpc_status st;
    char buf[512], text[4096] = "";
    int rc, n = 0;

    /* unary */
    Infinitehip__V1__TokenizeRequest tq = INFINITEHIP__V1__TOKENIZE_REQUEST__INIT;
    tq.input_case = INFINITEHIP__V1__TOKENIZE_REQUEST__INPUT_TEXT;
    tq.text = (char *)(uintptr_t) "one two three";
    ProtobufCMessage *resp = NULL;
    rc = rpc_unary(ch, "/infinitehip.v1.Generator/Tokenize", &tq.base,
                   &infinitehip__v1__tokenize_response__descriptor, a, &resp, 5000, &st);
    const Infinitehip__V1__TokenizeResponse *tr = (const Infinitehip__V1__TokenizeResponse *)resp;
    snprintf(buf, sizeof(buf), "rc=%d %s %s", rc, rpc_code_name(st.code), st.message);
    check("unary Tokenize → OK with 3 ids", rc == 0 && st.code == RPC_OK && tr && tr->n_ids == 3,
          buf);

    /* unary error: no input → INVALID_ARGUMENT / -EINVAL */
    Infinitehip__V1__TokenizeRequest empty = INFINITEHIP__V1__TOKENIZE_REQUEST__INIT;
    rc = rpc_unary(ch, "/infinitehip.v1.Generator/Tokenize", &empty.base,
                   &infinitehip__v1__tokenize_response__descriptor, a, &resp, 5000, &st);
    snprintf(buf, sizeof(buf), "rc=%d %s %s", rc, rpc_code_name(st.code), st.message);
    check("unary INVALID_ARGUMENT → -EINVAL, message kept",
          rc == -EINVAL && st.code == RPC_INVALID_ARGUMENT && strstr(st.message, "input") && !resp,
          buf);

    /* unknown method → UNIMPLEMENTED / -ENOSYS */
    rc = rpc_unary(ch, "/infinitehip.v1.Generator/Nope", &empty.base,
                   &infinitehip__v1__tokenize_response__descriptor, a, &resp, 5000, &st);
    snprintf(buf, sizeof(buf), "rc=%d %s", rc, rpc_code_name(st.code));
    check("unary unknown method → UNIMPLEMENTED (-ENOSYS)",
          rc == -ENOSYS && st.code == RPC_UNIMPLEMENTED, buf);

    /* server streaming */
    Infinitehip__V1__GenerateRequest gq = INFINITEHIP__V1__GENERATE_REQUEST__INIT;
    gq.prompt_case = INFINITEHIP__V1__GENERATE_REQUEST__PROMPT_TEXT;
    gq.text = (char *)(uintptr_t) "x y";
    gq.max_tokens = 5;
    rpc_stream *s = NULL;
    rc = rpc_stream_open(&s, ch, GEN, &gq.base, 5000, &st);
    if (rc == 0) rc = read_all(s, a, text, sizeof(text), &n, &st);
    rpc_stream_free(s);
    snprintf(buf, sizeof(buf), "rc=%d n=%d text='%.200s' %s", rc, n, text, rpc_code_name(st.code));
    check("stream Generate → 5 pieces then OK", rc == 0 && n == 5 && !strcmp(text, "x y x y x "),
          buf);

    /* deadline: 1000 tokens at 20 ms cannot fit 300 ms */
    gq.max_tokens = 1000;
    uint64_t t0 = cm_time_ns();
    rc = rpc_stream_open(&s, ch, GEN, &gq.base, 300, &st);
    if (rc == 0) rc = read_all(s, a, text, sizeof(text), &n, &st);
    rpc_stream_free(s);
    double dt = (double)(cm_time_ns() - t0) / 1e9;
    snprintf(buf, sizeof(buf), "rc=%d %s after %.2f s", rc, rpc_code_name(st.code), dt);
    check("stream deadline → DEADLINE_EXCEEDED (-ETIMEDOUT) after ~0.3 s",
          rc == -ETIMEDOUT && st.code == RPC_DEADLINE_EXCEEDED && dt > 0.25 && dt < 2, buf);

    /* client-side cancel after 2 pieces */
    rc = rpc_stream_open(&s, ch, GEN, &gq.base, 10000, &st);
    int pieces = 0;
    ProtobufCMessage *m;
    while (rc == 0 && (rc = rpc_stream_read(s, &infinitehip__v1__generate_response__descriptor, a,
                                            &m, &st)) == 1) {
        const Infinitehip__V1__GenerateResponse *r = (const Infinitehip__V1__GenerateResponse *)m;
        if (r->event_case == INFINITEHIP__V1__GENERATE_RESPONSE__EVENT_PIECE && ++pieces == 2)
            rpc_stream_cancel(s);
        rc = 0;
    }
    rpc_stream_free(s);
    snprintf(buf, sizeof(buf), "rc=%d pieces=%d %s", rc, pieces, rpc_code_name(st.code));
    check("stream cancel → CANCELLED (-ECANCELED)",
          rc == -ECANCELED && st.code == RPC_CANCELLED && pieces >= 2 && pieces < 10, buf);

    /* RESOURCE_EXHAUSTED with the retry delay: fill the 4 slots, then one more. The stream
     * cancelled just above frees its slot only when the server notices the cancel (later on a
     * loaded machine): a slot refused meanwhile is asked for again after the server's delay. */
    rpc_stream *busy[4] = {0};
    int admitted = 0;
    for (int i = 0; i < 4; i++) {
        for (int attempt = 0; attempt < 20; attempt++) {
            if (rpc_stream_open(&busy[i], ch, GEN, &gq.base, 20000, &st) == 0 &&
                rpc_stream_read(busy[i], &infinitehip__v1__generate_response__descriptor, a, &m,
                                &st) == 1) {
                admitted++;
                break;
            }
            rpc_stream_free(busy[i]);
            busy[i] = NULL;
            if (st.code != RPC_RESOURCE_EXHAUSTED) break;
            struct timespec ts = {0, 100 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    rc = rpc_stream_open(&s, ch, GEN, &gq.base, 5000, &st);
    if (rc == 0) rc = read_all(s, a, text, sizeof(text), &n, &st);
    rpc_stream_free(s);
    snprintf(buf, sizeof(buf), "admitted=%d rc=%d %s delay=%lld", admitted, rc,
             rpc_code_name(st.code), (long long)st.retry_delay_ms);
    check("RESOURCE_EXHAUSTED (-EAGAIN) with retry_delay_ms = 250",
          admitted == 4 && rc == -EAGAIN && st.code == RPC_RESOURCE_EXHAUSTED &&
              st.retry_delay_ms == 250,
          buf);
    for (int i = 0; i < 4; i++)
        rpc_stream_free(busy[i]); /* cancels them */

    /* client streaming: header + chunks + close_send. The cancelled streams above free their
     * slots as soon as the server notices: a RESOURCE_EXHAUSTED here is retried after the delay
     * the server asked for, as a real client does. */
    int attempts = 0;
    rc = 0;
    do {
        if (rc == -EAGAIN) {
            struct timespec ts = {(time_t)(st.retry_delay_ms / 1000),
                                  (long)(st.retry_delay_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        attempts++;
        rc = upload(ch, a, text, sizeof(text), &st);
    } while (rc == -EAGAIN && attempts < 5);
    snprintf(buf, sizeof(buf), "attempts=%d rc=%d text='%.200s' %s %.200s", attempts, rc, text,
             rpc_code_name(st.code), st.message);
    check("client streaming upload → generation over the uploaded prompt",
          rc == 0 && !strcmp(text, "up load up load "), buf);

    /* a dead target: UNAVAILABLE (-ECONNREFUSED), not a hang */
    rpc_channel *dead = NULL;
    rpc_channel_open(&dead, "127.0.0.1:1", 0, NULL);
    rc = rpc_unary(dead, "/infinitehip.v1.Generator/Tokenize", &tq.base,
                   &infinitehip__v1__tokenize_response__descriptor, a, &resp, 3000, &st);
    snprintf(buf, sizeof(buf), "rc=%d %s", rc, rpc_code_name(st.code));
    check("no server → UNAVAILABLE (-ECONNREFUSED)",
          rc == -ECONNREFUSED && st.code == RPC_UNAVAILABLE, buf);
    rpc_channel_free(dead);

    /* the mapping table is one place and round-trips for the codes the service uses */
    int codes[] = {RPC_OK,          RPC_INVALID_ARGUMENT,  RPC_RESOURCE_EXHAUSTED,
                   RPC_UNAVAILABLE, RPC_DEADLINE_EXCEEDED, RPC_CANCELLED,
                   RPC_NOT_FOUND,   RPC_UNIMPLEMENTED,     RPC_FAILED_PRECONDITION};
    bool round = true;
    for (size_t i = 0; i < CM_ARRAY_LEN(codes); i++)
        round &= rpc_code_from_err(rpc_err_from_code(codes[i])) == codes[i];
    check("status mapping round-trips",
          round && rpc_code_from_err(-CM_ELIMIT) == RPC_RESOURCE_EXHAUSTED &&
              rpc_code_from_err(-CM_EFORMAT) == RPC_INVALID_ARGUMENT &&
              rpc_code_from_err(-12345) == RPC_INTERNAL,
          NULL);

    rpc_arena_free(a);
    rpc_channel_free(ch);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
