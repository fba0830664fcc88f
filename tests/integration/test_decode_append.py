#!/usr/bin/env python3
"""test_decode_append.py — decode-time K/V written back to the store (--kv-retain finished) and
batched decode, end to end with real processes (tests/common/stack.py): a prefill worker that
creates a segment of 16-token blocks, and decode workers on it.

Checks:
- a finished request's prompt + answer is retained: `ihip-kv ls` shows a READY sequence of
  exactly its full 16-token blocks (the prompt's full blocks shared, not copied), GetStats counts
  it;
- a follow-up whose prompt = first prompt + first answer + new tokens (token ids, as a chat
  client would resend them) reports usage.cached_tokens = every full block of the first request's
  prompt + answer (what the prefill may reuse), and the retained sequence of the first turn is
  superseded by the second's;
- a prompt that needs more free blocks than the retained sequences leave gets them (retained
  sequences are released, LRU, instead of the request failing with "KV store full");
- after SIGTERM nothing is leased and `ihip-kv check` passes;
- a cold run of the follow-up (decode worker with --kv-retain none, nothing in the store:
  cached_tokens 0) gives the same tokens, token for token;
- three concurrent greedy requests (batched decode, --decode-batch exact) each give the tokens
  they give alone, and decode.batched_steps counts batched steps;
- bad --kv-retain / --decode-batch values stop the worker at start with a message.

Exit 0 pass, 1 fail, 77 skip (no model, binaries or grpcio).
"""
import os
import signal
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import stack  # noqa: E402
from stack import check, wait_for  # noqa: E402

sys.path.insert(0, os.path.join(stack.SRC, "tests", "clients", "python"))
try:
    import grpc
    from client import Api, collect
except ImportError as e:
    print(f"skip: grpcio / grpcio-health-checking / grpcio-reflection missing ({e})")
    print("0 passed, 0 failed")
    sys.exit(77)

TPB = 16
GREEDY = {"temperature": 0.0}
P1_TEXT = ("The history of the city goes back many centuries. Travellers who came to the market "
           "in the old square said that")
P2_TEXT = " Later, the people of the city"
P3_TEXT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def tokenize(api, text, add_bos=None):
    call, Req = api.method("Tokenize")
    req = Req(text=text) if add_bos is None else Req(text=text, add_bos=add_bos)
    return list(call(req, timeout=30).ids)


def retained_seqs(st):
    return [s for s in st.kv("ls").get("seqs", []) if s["state"] == "ready"]


def main():
    if stack.not_ready():
        return 77
    # 330 blocks = 11 token blocks of 16 tokens x 30 layers: small enough that retention must
    # give way to a larger prompt.
    st = stack.Stack(kv_blocks=330, block_tokens=TPB, handoff_ms=200)
    try:
        st.start_prefill()
        dec = st.start_decode("--kv-retain-max-seqs", "4")
        check("prefill worker SERVING", st.prefill.wait_serving())
        check("decode worker SERVING", dec.wait_serving())
        ch = grpc.insecure_channel(dec.addr)
        api = Api(ch)

        # ---- turn 1 ----------------------------------------------------------------------
        p1 = tokenize(api, P1_TEXT)
        _, a1, fin1, _ = collect(api.generate(tokens=p1, max_tokens=24, sampling=GREEDY,
                                              timeout=300))
        check("turn 1 finishes", fin1 is not None and len(a1) >= 1, str(fin1))
        n_past1 = len(p1) + len(a1) - 1  # the last sampled token never went through the model
        want_tokens = n_past1 // TPB * TPB
        check("turn 1 is retained (decode.kv_retained 1, published 1)",
              wait_for(lambda: api.stats().get("decode.kv_retained") == 1, 20) and
              api.stats().get("decode.kv_retain_published") == 1, str(api.stats()))
        # the prefill's hand-over lease goes after 200 ms; our lease on the prompt was released
        wait_for(lambda: len(retained_seqs(st)) == 1, 10)
        seqs = retained_seqs(st)
        check("ihip-kv ls: one READY sequence of the full blocks of prompt + answer, the prompt's "
              "full blocks shared",
              len(seqs) == 1 and seqs[0]["tokens"] == want_tokens and
              seqs[0]["prefix_tblocks"] == len(p1) // TPB and seqs[0]["leases"] == 1,
              f"{seqs} want {want_tokens} tokens, {len(p1) // TPB} shared")

        # ---- turn 2: the conversation goes on ------------------------------------------------
        p2 = p1 + a1 + tokenize(api, P2_TEXT, add_bos=False)
        _, a2, fin2, _ = collect(api.generate(tokens=p2, max_tokens=16, sampling=GREEDY,
                                              timeout=300))
        want_cached = min(n_past1 // TPB, (len(p2) - 1) // TPB) * TPB
        check("turn 2: usage.cached_tokens covers turn 1's prompt + answer blocks",
              fin2 is not None and fin2.usage.cached_tokens == want_cached and want_cached >
              len(p1) // TPB * TPB,
              f"cached {fin2.usage.cached_tokens if fin2 else None}, want {want_cached} "
              f"(prompt 1 alone: {len(p1) // TPB * TPB})")
        check("turn 2 supersedes turn 1 (one retained sequence, the longer one)",
              wait_for(lambda: api.stats().get("decode.kv_retain_released_superseded") == 1 and
                       api.stats().get("decode.kv_retained") == 1, 20), str(api.stats()))
        print(f"     (turn 1: {len(p1)} prompt + {len(a1)} generated tokens; turn 2: {len(p2)} "
              f"prompt tokens, {fin2.usage.cached_tokens if fin2 else '?'} cached)")

        # ---- a larger prompt: retention gives way --------------------------------------------
        p3 = tokenize(api, P3_TEXT)
        # prompt + 110 tokens: 8 token blocks = 240 of the 330 blocks; turn 2 holds 120
        text3, a3, fin3, _ = collect(api.generate(tokens=p3, max_tokens=110, sampling=GREEDY,
                                                  timeout=300))
        check("a prompt needing the retained blocks succeeds (retained sequences released)",
              fin3 is not None and api.stats().get("decode.kv_retain_released_pressure", 0) >= 1,
              f"{fin3} {api.stats()}")
        ch.close()
        rc = dec.stop()
        check("decode worker exits 0 on SIGTERM", rc == 0, str(rc))
        check("after SIGTERM: no lease, no sequence left",
              wait_for(lambda: st.kv("stats").get("leases") == 0 and not retained_seqs(st), 10),
              str(st.kv("stats")))
        ok, out = st.kv_check()
        check("ihip-kv check passes", ok, out)

        # ---- cold run of turn 2 ----------------------------------------------------------------
        dec = st.start_decode("--kv-retain", "none")
        check("cold decode worker SERVING", dec.wait_serving())
        ch = grpc.insecure_channel(dec.addr)
        api = Api(ch)
        _, c2, cfin, _ = collect(api.generate(tokens=p2, max_tokens=16, sampling=GREEDY,
                                              timeout=300))
        check("cold turn 2 has nothing cached", cfin is not None and cfin.usage.cached_tokens == 0,
              str(cfin.usage if cfin else None))
        check("turn 2 on retained K/V equals the cold run token for token", c2 == a2,
              f"\n  warm {a2}\n  cold {c2}")
        check("--kv-retain none retains nothing", api.stats().get("decode.kv_retained") == 0 and
              api.stats().get("decode.kv_retain_published") == 0)

        # ---- batched decode ------------------------------------------------------------------
        prompts = [p1, p3, tokenize(api, "Once upon a time, in a small village,")]
        alone = [collect(api.generate(tokens=p, max_tokens=20, sampling=GREEDY, timeout=300))[1]
                 for p in prompts]
        before = api.stats().get("decode.batched_steps", 0)
        res = [None] * 3
        go = threading.Barrier(3)

        def run(i):
            go.wait()
            res[i] = collect(api.generate(tokens=prompts[i], max_tokens=20, sampling=GREEDY,
                                          timeout=300))[1]
        ths = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(timeout=600)
        check("3 concurrent greedy requests each give the tokens they give alone", res == alone,
              f"\n  {res}\n  {alone}")
        check("their steps went through batched decode (decode.batched_steps grows)",
              api.stats().get("decode.batched_steps", 0) > before, str(api.stats()))
        ch.close()
        check("cold decode worker exits 0", dec.stop() == 0)
        st.decode = None

        # ---- bad options ---------------------------------------------------------------------
        for flag, val in (("--kv-retain", "always"), ("--decode-batch", "maybe")):
            rc, err = stack.run_worker("ihip-decode-worker", st.decode_args(flag, val))
            check(f"{flag} {val}: the worker exits non-zero naming the flag",
                  rc != 0 and flag in err, f"{rc} {err[-300:]}")
    finally:
        if stack.counts()[1] and st.decode:
            sys.stdout.write("".join(st.decode.log[-30:]))
        st.close()
    n_pass, n_fail = stack.counts()
    print(f"{n_pass} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
