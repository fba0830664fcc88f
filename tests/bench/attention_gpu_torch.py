#!/usr/bin/env python3
"""attention_gpu_torch.py — PyTorch SDPA decode latency for the shapes of attention_gpu.

One Llama-3.1-8B layer (32 query heads, 8 KV heads, head_dim 128, bf16, batch 1), one query
token against T keys, torch.nn.functional.scaled_dot_product_attention with each backend forced
through torch.nn.attention.sdpa_kernel (cuDNN, flash, efficient; math only for small T).
GQA: enable_gqa=True when this torch accepts it, else K/V expanded to 32 heads (the expand's
copy is made once, outside the timing). CUDA events, warm-up, median of --reps. Every backend runs
in its own try/except and prints why it failed. Prints the same table format as attention_gpu and
writes CSV (op,T,n_tok,median_ms,bytes,GB_per_s,TFLOP_per_s,reps,note).

Two timings per backend (math: the first only), as in attention_gpu:
  "torch sdpa NAME"          events around ONE call (Python dispatch and launch inside);
  "torch sdpa NAME [graph]"  32 back-to-back calls captured in one torch.cuda.CUDAGraph (the
                             layers of one decode step), events around one replay, median over
                             --graph-reps replays divided by 32 = GPU time per call. All 32 calls
                             read the same K/V (T x 4 KiB, far beyond L2 at these T).

With --prefill T (e.g. 1M): also the prefill of one --prefill-chunk (32K) chunk of queries at
the end of a T-token context, as attention_gpu's prefill row: 32768 queries x T keys, the causal
mask aligned to the bottom right (query i of the chunk sees keys <= T - chunk + i;
torch.nn.attention.bias.causal_lower_right), cuDNN / flash / efficient backends, median of
--prefill-reps calls; TFLOP/s counted on the visible (causal) part, 4 d flops per score.

    python3 tests/bench/attention_gpu_torch.py [--sizes 128K,256K,512K,1M,2M,4M] [--reps 20]
                                               [--graph-reps 10] [--no-graph]
                                               [--csv PATH] [--math-max 262144]
                                               [--prefill 1M] [--prefill-chunk 32K]
                                               [--prefill-reps 3]
"""
import argparse
import contextlib
import statistics
import sys

H, HKV, D = 32, 8, 128
GRAPH_CALLS = 32


def parse_size(s):
    s = s.strip()
    mult = 1
    if s[-1] in "kK":
        mult, s = 1024, s[:-1]
    elif s[-1] in "mM":
        mult, s = 1024 * 1024, s[:-1]
    return int(float(s) * mult)


def first_line(e):
    """The first line of an exception's message (160 characters at most)."""
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else ""


def sync_quietly(torch):
    """Let a failed call's work finish; a broken context only stays broken."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def make_qkv(torch, n_q, T, gqa):
    """Random bf16 q [1, H, n_q, D] and k, v [1, HKV, T, D] (expanded to H heads without GQA)."""
    q = torch.randn(1, H, n_q, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    if not gqa:
        k = k.repeat_interleave(H // HKV, dim=1)
        v = v.repeat_interleave(H // HKV, dim=1)
    return q, k, v


def backend_ctx(sdpa_kernel, be):
    """The context forcing backend be (no-op without sdpa_kernel)."""
    return sdpa_kernel([be]) if be is not None else contextlib.nullcontext()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="128K,256K,512K,1M,2M,4M")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--graph-reps", type=int, default=10)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--math-max", type=int, default=256 * 1024,
                    help="largest T for the math fallback (it materialises the scores)")
    ap.add_argument("--prefill", default=None, help="context of the prefill row (e.g. 1M)")
    ap.add_argument("--prefill-chunk", default="32K")
    ap.add_argument("--prefill-reps", type=int, default=3)
    args = ap.parse_args()

    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001
        print(f"torch not importable: {e}")
        return 77
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 77
    print(f"torch {torch.__version__}, device: {torch.cuda.get_device_name(0)}")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001
        print(f"torch.nn.attention.sdpa_kernel unavailable ({e}): default dispatch only")
        SDPBackend, sdpa_kernel = None, None

    backends = []
    if SDPBackend is not None:
        for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
            if hasattr(SDPBackend, name):
                backends.append((name.lower(), getattr(SDPBackend, name)))
    else:
        backends.append(("default", None))

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    reps = max(1, args.reps)
    rows = []
    csv = open(args.csv, "w") if args.csv else None
    if csv:
        csv.write("op,T,n_tok,median_ms,bytes,GB_per_s,TFLOP_per_s,reps,note\n")

    def timed(fn):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end))
        return statistics.median(ts)

    def timed_graph(fn):
        """Per-call median ms of fn in a CUDA graph of GRAPH_CALLS back-to-back calls."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch asks
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = [fn() for _ in range(GRAPH_CALLS)]
        for _ in range(2):
            g.replay()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(max(1, args.graph_reps)):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end) / GRAPH_CALLS)
        del outs, g
        return statistics.median(ts)

    def add(op, T, ms, nbytes, note, nreps=None):
        gbs = nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else 0.0
        line = f"  {op:<36s} T {T:8d} n_tok {1:6d}  {ms if ms else -1:10.4f} ms"
        if ms and ms > 0:
            line += f"  {gbs:8.1f} GB/s"
        if note:
            line += "  " + note
        print(line, flush=True)
        rows.append((op, T, ms, gbs))
        if csv:
            csv.write(f"{op},{T},1,{ms if ms else -1:.6f},{nbytes:.0f},{gbs:.3f},0,"
                      f"{nreps or reps},{note}\n")

    # probe enable_gqa once
    gqa = True
    try:
        q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, 16, D, device="cuda", dtype=torch.bfloat16)
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    except Exception as e:  # noqa: BLE001
        print(f"enable_gqa not usable ({type(e).__name__}: {e}); K/V expanded to {H} heads")
        gqa = False

    print(f"decode (1 query, {H} heads / {HKV} KV heads, d {D}, bf16):")
    for T in sizes:
        nbytes = T * HKV * D * 2 * 2
        try:
            q, k, v = make_qkv(torch, 1, T, gqa)
        except Exception as e:  # noqa: BLE001
            print(f"  T {T}: cannot allocate inputs: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
            continue
        for name, be in backends:
            op = f"torch sdpa {name}"
            if name == "math" and T > args.math_max:
                print(f"  {op:<28s} T {T:8d}: skipped (math fallback above --math-max)")
                continue
            kw = {"enable_gqa": True} if gqa else {}

            def call():
                return F.scaled_dot_product_attention(q, k, v, **kw)

            try:
                with backend_ctx(sdpa_kernel, be):
                    ms = timed(call)
                add(op, T, ms, nbytes, "" if gqa else "expanded K/V")
            except Exception as e:  # noqa: BLE001
                print(f"  {op:<28s} T {T:8d}: failed: {type(e).__name__}: {first_line(e)}")
                torch.cuda.synchronize()
                continue
            if args.no_graph or name == "math":
                continue
            gop = op + " [graph]"
            try:
                with backend_ctx(sdpa_kernel, be):
                    ms = timed_graph(call)
                add(gop, T, ms, nbytes,
                    f"per call, {GRAPH_CALLS}-call graph" + ("" if gqa else ", expanded K/V"),
                    max(1, args.graph_reps))
            except Exception as e:  # noqa: BLE001
                print(f"  {gop:<36s} T {T:8d}: capture/replay failed: {type(e).__name__}: "
                      f"{first_line(e)}")
                sync_quietly(torch)
        del q, k, v
        torch.cuda.empty_cache()

    if args.prefill:
        prefill_rows(args, torch, F, backends, sdpa_kernel, gqa, csv)

    print("\nsummary (median ms; one layer, batch 1):")
    names = sorted({r[0] for r in rows})
    print("%10s " % "T" + " ".join("%24s" % n.replace("torch sdpa ", "") for n in names))
    for T in sizes:
        cells = []
        for n in names:
            ms = next((r[2] for r in rows if r[0] == n and r[1] == T), None)
            cells.append("%24s" % (f"{ms:.4f}" if ms else "-"))
        print("%10d " % T + " ".join(cells))
    if csv:
        csv.close()
    return 0


def prefill_rows(args, torch, F, backends, sdpa_kernel, gqa, csv):
    """One chunk of queries at the end of a long context, dense SDPA (bottom-right causal)."""
    T, C = parse_size(args.prefill), parse_size(args.prefill_chunk)
    try:
        from torch.nn.attention.bias import causal_lower_right
    except Exception as e:  # noqa: BLE001
        print(f"prefill: causal_lower_right unavailable ({e}): skipped")
        return
    visible = C * (T - C) + C * (C + 1) / 2  # scores on or below the diagonal
    flops = 4.0 * D * H * visible
    print(f"prefill ({C} queries at the end of {T} keys, {H}/{HKV} heads, d {D}, bf16, "
          f"bottom-right causal):")
    try:
        q, k, v = make_qkv(torch, C, T, gqa)
        mask = causal_lower_right(C, T)
    except Exception as e:  # noqa: BLE001
        print(f"  prefill: cannot allocate inputs: {type(e).__name__}: {e}")
        return
    kw = {"enable_gqa": True} if gqa else {}
    for name, be in backends:
        if name == "math":
            continue
        op = f"torch sdpa {name} prefill"

        def call():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)

        try:
            with backend_ctx(sdpa_kernel, be):
                call()
                torch.cuda.synchronize()
                ts = []
                for _ in range(max(1, args.prefill_reps)):
                    st = torch.cuda.Event(enable_timing=True)
                    en = torch.cuda.Event(enable_timing=True)
                    st.record()
                    call()
                    en.record()
                    en.synchronize()
                    ts.append(st.elapsed_time(en))
            ms = statistics.median(ts)
            tf = flops / (ms * 1e-3) / 1e12
            print(f"  {op:<36s} T {T:8d} n_tok {C:6d}  {ms:10.2f} ms  {tf:7.1f} TFLOP/s", flush=True)
            if csv:
                csv.write(f"{op},{T},{C},{ms:.4f},0,0,{tf:.3f},{len(ts)},bottom-right causal\n")
        except Exception as e:  # noqa: BLE001
            print(f"  {op:<36s} T {T:8d}: failed: {type(e).__name__}: {first_line(e)}")
            sync_quietly(torch)
    del q, k, v
    torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
