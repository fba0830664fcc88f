"""Benchmark: our CPU engine vs llama.cpp (llama-cpp-python) on the same GGUF, same threads,
same token ids, in one process run, printed side by side as ratios.

  prefill tokens/s for prompts of 512, 4096 and 8192 tokens (one call each, after a warm-up);
  decode tokens/s for N_DECODE greedy tokens after each of those prompts.

Usage: .venv/bin/python tests/bench/cpu_engine.py [--threads N] [--sizes 512,4096,8192] [--decode 32]
Not a test: it measures speed. Record results in tests/bench/RESULTS.md.
"""
import argparse
import inspect
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
import ihip_ctypes as ic  # noqa: E402
import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402


def last_logits(llm):
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def corpus_tokens(llm, n):
    import argparse as a1, collections as a2, dataclasses as a3, email.message as a4, http.client as a5, inspect as a6
    text = "".join(inspect.getsource(m) for m in (a1, a2, a3, a4, a5, a6))
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    assert len(ids) >= n, (len(ids), n)
    return ids[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--sizes", default="512,4096,8192")
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    n_ctx = max(sizes) + args.decode + 8
    T = args.threads
    llm = llama_cpp.Llama(model_path=ic.MODEL, n_ctx=n_ctx, n_threads=T, n_threads_batch=T, n_batch=512,
                          verbose=False)
    lib = ic.load()
    ours = ic.Engine(lib, n_ctx=n_ctx, threads=T)
    rows = []
    warm = corpus_tokens(llm, 64)
    llm.reset(); llm.eval(warm)
    ours.reset(); ours.prefill(warm)
    for n in sizes:
        ids = corpus_tokens(llm, n)
        res = {}
        # llama.cpp
        llm.reset()
        t0 = time.perf_counter(); llm.eval(ids); tp = time.perf_counter() - t0
        tok = int(np.argmax(last_logits(llm)))
        t0 = time.perf_counter()
        for _ in range(args.decode):
            llm.eval([tok])
            tok = int(np.argmax(last_logits(llm)))
        td = time.perf_counter() - t0
        res["llama"] = (n / tp, args.decode / td)
        # ours
        ours.reset()
        t0 = time.perf_counter(); lg = ours.prefill(ids); tp = time.perf_counter() - t0
        tok = int(np.argmax(lg))
        t0 = time.perf_counter()
        for _ in range(args.decode):
            lg = ours.decode(tok)
            tok = int(np.argmax(lg))
        td = time.perf_counter() - t0
        res["ours"] = (n / tp, args.decode / td)
        rows.append((n, res))
        print(f"ctx {n}: done", file=sys.stderr)
    la = os.getloadavg()
    print(f"threads {T}, decode {args.decode} tokens, model {os.path.basename(ic.MODEL)}, "
          f"load average at the end {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min; > threads means "
          f"other processes competed for the cores, which hurts llama.cpp's spinning threads more)")
    print(f"| prompt | prefill ours tok/s | prefill llama.cpp tok/s | ratio | decode ours tok/s | decode llama.cpp tok/s | ratio |")
    print(f"|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in rows:
        po, dl = r["ours"]
        pl, dll = r["llama"]
        print(f"| {n} | {po:.1f} | {pl:.1f} | {po/pl:.2f}x | {dl:.1f} | {dll:.1f} | {dl/dll:.2f}x |")
    ours.close()


if __name__ == "__main__":
    main()
