#!/usr/bin/env python3
"""decode_batch.py — decode throughput of the decode worker for 1, 2, 4 concurrent greedy
sequences with each --decode-batch mode (off = the per-sequence mdl_decode loop; exact / fast =
mdl_decode_batch, see common/model/model.h), on a real prefill + decode stack.

For each mode a decode worker is started on the same prefill worker; for each concurrency n the
n requests start together (counting prompts, so greedy decoding does not stop at EOS early) and
the aggregate rate is (sum of generated tokens - n) / (last end - first first-token time), from
the client's clock. Each point is the best of --reps runs. Prints a table and the load average;
not run by ctest.

  .venv/bin/python tests/bench/decode_batch.py [--tokens 48] [--threads 2] [--reps 2]
Environment: IHIP_BIN (build/bin), IHIP_MODEL.
"""
import argparse
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import stack  # noqa: E402

sys.path.insert(0, os.path.join(stack.SRC, "tests", "clients", "python"))
import grpc  # noqa: E402
from client import Api  # noqa: E402

PROMPTS = ["1, 2, 3, 4, 5, 6, 7, 8,", "10, 11, 12, 13, 14, 15,", "100, 101, 102, 103, 104,",
           "2, 4, 6, 8, 10, 12, 14,"]


def one_run(api, n, tokens):
    stack.wait_for(lambda: api.stats().get("decode.sequences_admitted") == 0, 30)
    starts, ends, gens = [None] * n, [None] * n, [0] * n
    go = threading.Barrier(n)

    def run(i):
        go.wait()
        for r in api.generate(prompt=PROMPTS[i], max_tokens=tokens,
                              sampling={"temperature": 0.0}, timeout=600):
            kind = r.WhichOneof("event")
            if kind == "piece":
                if starts[i] is None:
                    starts[i] = time.monotonic()
                gens[i] += len(r.piece.token_ids)
        ends[i] = time.monotonic()
    ths = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return (sum(gens) - n) / (max(ends) - min(starts)), sum(gens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", default="off,exact,fast")
    ap.add_argument("--conc", default="1,2,4")
    a = ap.parse_args()
    st = stack.Stack(kv_blocks=4096, threads=a.threads)
    res = {}
    try:
        st.start_prefill()
        st.prefill.wait_serving()
        for mode in a.modes.split(","):
            dec = st.start_decode("--decode-batch", mode, "--kv-retain", "none", "--max-seqs", "8")
            dec.wait_serving()
            ch = grpc.insecure_channel(dec.addr)
            api = Api(ch)
            one_run(api, 1, 4)  # warm-up
            for n in (int(x) for x in a.conc.split(",")):
                best = max(one_run(api, n, a.tokens) for _ in range(a.reps))
                res[(mode, n)] = best
                print(f"{mode:6s} n={n}: {best[0]:6.1f} tok/s ({best[1]} tokens)", flush=True)
            ch.close()
            dec.stop()
            st.decode = None
    finally:
        st.close()
    modes = a.modes.split(",")
    print("\n| sequences | " + " | ".join(f"{m} tok/s" for m in modes) + " |")
    print("|---:|" + "---:|" * len(modes))
    for n in (int(x) for x in a.conc.split(",")):
        print(f"| {n} | " + " | ".join(f"{res[(m, n)][0]:.1f}" for m in modes) + " |")
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
