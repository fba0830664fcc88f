/*
 * ihip-chat.c — `ihip chat`: the C client of the service. Sends one Generate to a decode worker
 * (a user message rendered with the model's chat template on the worker, or raw text with --raw),
 * streams the pieces to stdout, prefill progress and the final usage/timings to stderr. A failed
 * call prints its gRPC status (and the retry delay of RESOURCE_EXHAUSTED) and exits 1.
 */
#define _POSIX_C_SOURCE 200809L
#include "cli.h"
#include "rpc/rpc.h"
#include "infinitehip/v1/generator.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *finish_name(int r)
{
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&infinitehip__v1__finish_reason__descriptor, r);
    return v ? v->name : "?";
}

int cmd_chat(int argc, char **argv)
{
    struct opts o;
    if (cli_parse_opts(argc, argv, &o)) return 2;
    cm_err err = {0};
    if (smp_params_validate(&o.sp, &err) < 0) return die("%s", err.msg);
    size_t len;
    char *text = cli_get_prompt(&o, &len);
    if (!text) return 1;

    Infinitehip__V1__GenerateRequest req = INFINITEHIP__V1__GENERATE_REQUEST__INIT;
    Infinitehip__V1__ChatMessages chat = INFINITEHIP__V1__CHAT_MESSAGES__INIT;
    Infinitehip__V1__ChatMessage msg[2] = {INFINITEHIP__V1__CHAT_MESSAGE__INIT,
                                           INFINITEHIP__V1__CHAT_MESSAGE__INIT};
    Infinitehip__V1__ChatMessage *msgs[2];
    if (o.raw) {
        req.prompt_case = INFINITEHIP__V1__GENERATE_REQUEST__PROMPT_TEXT;
        req.text = text;
    } else {
        size_t n = 0;
        if (o.system) {
            msg[n].role = (char *)(uintptr_t) "system";
            msg[n].content = (char *)(uintptr_t)o.system;
            msgs[n] = &msg[n];
            n++;
        }
        msg[n].role = (char *)(uintptr_t) "user";
        msg[n].content = text;
        msgs[n] = &msg[n];
        n++;
        chat.n_messages = n;
        chat.messages = msgs;
        req.prompt_case = INFINITEHIP__V1__GENERATE_REQUEST__PROMPT_CHAT;
        req.chat = &chat;
    }
    Infinitehip__V1__SamplingParams sp = INFINITEHIP__V1__SAMPLING_PARAMS__INIT;
    if (o.sp_set[0]) {
        sp.opt_temperature_case = INFINITEHIP__V1__SAMPLING_PARAMS__OPT_TEMPERATURE_TEMPERATURE;
        sp.temperature = o.sp.temperature;
    }
    if (o.sp_set[1]) {
        sp.opt_top_k_case = INFINITEHIP__V1__SAMPLING_PARAMS__OPT_TOP_K_TOP_K;
        sp.top_k = o.sp.top_k;
    }
    if (o.sp_set[2]) {
        sp.opt_top_p_case = INFINITEHIP__V1__SAMPLING_PARAMS__OPT_TOP_P_TOP_P;
        sp.top_p = o.sp.top_p;
    }
    if (o.sp_set[3]) {
        sp.opt_min_p_case = INFINITEHIP__V1__SAMPLING_PARAMS__OPT_MIN_P_MIN_P;
        sp.min_p = o.sp.min_p;
    }
    if (o.sp_set[4]) {
        sp.opt_seed_case = INFINITEHIP__V1__SAMPLING_PARAMS__OPT_SEED_SEED;
        sp.seed = o.sp.seed;
    }
    req.sampling = &sp;
    req.max_tokens = (uint32_t)o.n_predict;

    int ret = 1;
    rpc_channel *ch = NULL;
    rpc_stream *s = NULL;
    rpc_arena *arena = rpc_arena_init(0);
    rpc_status st = {0};
    if (!arena || rpc_channel_open(&ch, o.addr, 0, &err) < 0) {
        die("cannot open a channel to %s: %s", o.addr, err.msg[0] ? err.msg : "out of memory");
        goto out;
    }
    int rc = rpc_stream_open(&s, ch, "/infinitehip.v1.Generator/Generate", &req.base, o.timeout_ms, &st);
    ProtobufCMessage *m;
    bool finished = false;
    while (rc == 0 && (rc = rpc_stream_read(s, &infinitehip__v1__generate_response__descriptor, arena,
                                            &m, &st)) == 1) {
        const Infinitehip__V1__GenerateResponse *r = (const Infinitehip__V1__GenerateResponse *)m;
        if (r->event_case == INFINITEHIP__V1__GENERATE_RESPONSE__EVENT_PIECE) {
            fputs(r->piece->text, stdout);
            fflush(stdout);
        } else if (r->event_case == INFINITEHIP__V1__GENERATE_RESPONSE__EVENT_PROGRESS && !o.quiet) {
            fprintf(stderr, "\rprefill: %llu / %llu tokens (%llu cached)",
                    (unsigned long long)r->progress->prompt_tokens_done,
                    (unsigned long long)r->progress->prompt_tokens_total,
                    (unsigned long long)r->progress->cached_tokens);
        } else if (r->event_case == INFINITEHIP__V1__GENERATE_RESPONSE__EVENT_FINISHED) {
            const Infinitehip__V1__Finished *f = r->finished;
            finished = true;
            fputc('\n', stdout);
            if (!o.quiet) {
                const Infinitehip__V1__Usage *u = f->usage;
                const Infinitehip__V1__Timings *t = f->timings;
                fprintf(stderr, "\nihip chat: finish %s | prompt %llu tokens (%llu cached), generated %llu",
                        finish_name(f->reason), u ? (unsigned long long)u->prompt_tokens : 0ull,
                        u ? (unsigned long long)u->cached_tokens : 0ull,
                        u ? (unsigned long long)u->generated_tokens : 0ull);
                if (t)
                    fprintf(stderr, " | queue %.1f ms, prefill %.1f ms, TTFT %.1f ms, %.1f ms/token",
                            (double)t->queue_us / 1e3, (double)t->prefill_us / 1e3,
                            (double)t->ttft_us / 1e3, t->per_token_us / 1e3);
                fprintf(stderr, " | request %s\n", f->request_id);
            }
        }
        rpc_arena_reset(arena);
        rc = 0;
    }
    if (rc < 0) {
        if (st.retry_delay_ms >= 0)
            die("%s: %s (retry after %lld ms)", rpc_code_name(st.code), st.message,
                (long long)st.retry_delay_ms);
        else
            die("%s: %s", rpc_code_name(st.code), st.message);
        goto out;
    }
    if (!finished) {
        die("the stream ended without a final message");
        goto out;
    }
    ret = 0;
out:
    rpc_stream_free(s);
    rpc_channel_free(ch);
    rpc_arena_free(arena);
    free(text);
    return ret;
}

/* `ihip health --addr HOST:PORT [--timeout-ms MS]`: poll grpc.health.v1 Check (overall
 * server status) until SERVING or the timeout passes (default 0: ask once). Exit 0 if SERVING. */
int cmd_health(int argc, char **argv)
{
    struct opts o;
    if (cli_parse_opts(argc, argv, &o)) return 2;
    cm_err err = {0};
    rpc_channel *ch = NULL;
    rpc_arena *arena = rpc_arena_init(0);
    if (!arena || rpc_channel_open(&ch, o.addr, 0, &err) < 0) {
        rpc_arena_free(arena);
        return die("cannot open a channel to %s", o.addr);
    }
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)(uintptr_t) "";
    uint64_t end = cm_time_ns() + (uint64_t)o.timeout_ms * 1000000ull;
    int status = -1;
    rpc_status st = {0};
    for (;;) {
        ProtobufCMessage *m = NULL;
        int rc = rpc_unary(ch, "/grpc.health.v1.Health/Check", &req.base,
                           &grpc__health__v1__health_check_response__descriptor, arena, &m, 1000, &st);
        status = rc == 0 ? (int)((Grpc__Health__V1__HealthCheckResponse *)m)->status : -1;
        rpc_arena_reset(arena);
        if (status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ||
            cm_time_ns() >= end)
            break;
        struct timespec ts = {0, 100 * 1000000L};
        nanosleep(&ts, NULL);
    }
    rpc_channel_free(ch);
    rpc_arena_free(arena);
    const ProtobufCEnumValue *v = status >= 0 ? protobuf_c_enum_descriptor_get_value(
        &grpc__health__v1__health_check_response__serving_status__descriptor, status) : NULL;
    printf("%s: %s\n", o.addr, v ? v->name : rpc_code_name(st.code));
    return status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? 0 : 1;
}
