#!/usr/bin/env python3
"""load.py — load benchmark of the decode worker's streaming Generate.

Starts a local stack (ihip-prefill-worker --kv-create + ihip-decode-worker on loopback, sharing a
kvstore segment in a temporary directory), or targets a running worker with --addr. For each
concurrency level N it runs N client streams for D seconds; each stream issues Generate requests
back to back (a new one as soon as the last ends, on its own channel unless --shared-channel),
and then measures:

  requests/s, generated tokens/s          completed requests and their tokens over the wall time
                                          (from the start until the last stream ended)
  TTFT p50/p99                            client side: call start -> first Piece
  inter-token latency p50/p99             client side: gap between consecutive Pieces, divided by
                                          the token ids the later Piece carries
  end-to-end latency p50/p99              call start -> stream end
  server TTFT / per-token p50             from Finished.timings (the worker's own measurement)
  errors by status code                   RESOURCE_EXHAUSTED waits its retry-delay-ms trailer

Prompts are token ids cut from a tokenized text (exactly --prompt-tokens ids; each request starts
at another offset, so consecutive prompts differ). Prints a table and writes JSON (--json).

Usage: load.py [--addr HOST:PORT] [--concurrency 1,2,4] [--duration 20] [--prompt-tokens 16]
               [--max-tokens 32] [--temperature 0.0] [--seed 1] [--warmup 1] [--json out.json]
               [--bin DIR] [--model M.gguf] [--threads 1] [--max-seqs 8]
Exit 0 when every level ran (errors are reported, not fatal), 1 on a setup failure.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("IHIP_SRC") or os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(SRC, "tests", "clients", "python"))

import grpc  # noqa: E402
from client import Api  # noqa: E402

TEXT = ("The history of the city goes back many centuries. Travellers who came to the market in "
        "the old square said that the merchants sold spices, cloth and silver from distant lands, "
        "and that the river was so full of boats that one could cross it without getting wet. "
        "In the spring the fields around the walls turned green, and the farmers brought their "
        "lambs to be sold; in the autumn the harvest festival filled every street with music. ")


# ---- local stack --------------------------------------------------------------------------------

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Worker:
    def __init__(self, path, args):
        self.proc = subprocess.Popen([path, *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="replace")
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (\d+)", line)
        if not m:
            raise RuntimeError(f"{path} did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.addr = f"127.0.0.1:{m.group(1)}"
        self.log = []
        self._t = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self._t.start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class LocalStack:
    def __init__(self, bindir, model, threads, max_seqs, ctx):
        self.dir = tempfile.mkdtemp(prefix="ihip-load-")
        self.workers = []
        pport = free_port()
        self.workers.append(Worker(os.path.join(bindir, "ihip-prefill-worker"), [
            "--model", model, "--listen", f"127.0.0.1:{pport}", "--kv-dir", self.dir,
            "--kv-create", "--kv-blocks", "1024", "--threads", str(threads),
            "--max-concurrent", str(max_seqs), "--ctx", str(ctx), "--handoff-ms", "2000"]))
        dec = Worker(os.path.join(bindir, "ihip-decode-worker"), [
            "--model", model, "--prefill", f"127.0.0.1:{pport}", "--kv-dir", self.dir,
            "--threads", str(threads), "--ctx", str(ctx), "--max-seqs", str(max_seqs)])
        self.workers.append(dec)
        self.addr = dec.addr

    def close(self):
        rcs = [w.stop() for w in reversed(self.workers)]
        shutil.rmtree(self.dir, ignore_errors=True)
        return rcs


def wait_serving(addr, timeout):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    ch = grpc.insecure_channel(addr)
    stub = health_pb2_grpc.HealthStub(ch)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        return False
    finally:
        ch.close()


# ---- measurement --------------------------------------------------------------------------------

def pct(xs, q):
    """Nearest-rank percentile (q in [0, 100]) of a list; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


class Stats:
    def __init__(self):
        self.mu = threading.Lock()
        self.ttft, self.itl, self.e2e = [], [], []
        self.server_ttft, self.server_tpt = [], []
        self.requests = 0
        self.tokens = 0
        self.prompt_tokens = 0
        self.errors = {}
        self.finish = {}


def one_stream(api, args, prompts, stop_at, st, idx):
    call, Req = api.method("Generate")
    n = idx
    while time.monotonic() < stop_at:
        req = Req(max_tokens=args.max_tokens)
        req.tokens.ids.extend(prompts[n % len(prompts)])
        n += args.concurrency_now
        req.sampling.temperature = args.temperature
        if args.seed is not None:
            req.sampling.seed = args.seed + n
        t0 = time.monotonic()
        first = last = None
        itl, n_tok, fin = [], 0, None
        try:
            for r in call(req, timeout=args.timeout):
                kind = r.WhichOneof("event")
                if kind == "piece":
                    now = time.monotonic()
                    k = max(1, len(r.piece.token_ids))
                    if first is None:
                        first = now
                    else:
                        itl.extend([(now - last) / k] * k)
                    last = now
                    n_tok += len(r.piece.token_ids)
                elif kind == "finished":
                    fin = r.finished
        except grpc.RpcError as e:
            with st.mu:
                st.errors[e.code().name] = st.errors.get(e.code().name, 0) + 1
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                md = dict(e.trailing_metadata() or ())
                time.sleep(int(md.get("retry-delay-ms", "100")) / 1000.0)
            elif e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                time.sleep(0.1)
            continue
        t1 = time.monotonic()
        with st.mu:
            st.requests += 1
            st.tokens += n_tok
            if first is not None:
                st.ttft.append(first - t0)
            st.itl.extend(itl)
            st.e2e.append(t1 - t0)
            if fin is not None:
                st.prompt_tokens += fin.usage.prompt_tokens
                st.server_ttft.append(fin.timings.ttft_us / 1e6)
                if fin.timings.per_token_us > 0:
                    st.server_tpt.append(fin.timings.per_token_us / 1e6)
                st.finish[fin.reason] = st.finish.get(fin.reason, 0) + 1


def run_level(addr, args, prompts, n, duration):
    args.concurrency_now = n
    st = Stats()
    chans = [grpc.insecure_channel(addr) for _ in range(1 if args.shared_channel else n)]
    apis = [Api(ch) for ch in chans]
    for a in apis:  # resolve the descriptors before the clock starts
        a.method("Generate")
    t_start = time.monotonic()
    stop_at = t_start + duration
    ths = [threading.Thread(target=one_stream, args=(apis[i % len(apis)], args, prompts, stop_at,
                                                      st, i)) for i in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.monotonic() - t_start
    for ch in chans:
        ch.close()
    ms = (lambda x: None if x is None else round(x * 1000, 2))
    return {
        "concurrency": n, "duration_s": duration, "wall_s": round(wall, 3),
        "requests": st.requests, "requests_per_s": round(st.requests / wall, 3),
        "tokens": st.tokens, "tokens_per_s": round(st.tokens / wall, 2),
        "prompt_tokens": st.prompt_tokens,
        "ttft_ms": {"p50": ms(pct(st.ttft, 50)), "p99": ms(pct(st.ttft, 99))},
        "itl_ms": {"p50": ms(pct(st.itl, 50)), "p99": ms(pct(st.itl, 99))},
        "e2e_ms": {"p50": ms(pct(st.e2e, 50)), "p99": ms(pct(st.e2e, 99))},
        "server_ttft_ms_p50": ms(pct(st.server_ttft, 50)),
        "server_per_token_ms_p50": ms(pct(st.server_tpt, 50)),
        "errors": st.errors, "finish_reasons": {str(k): v for k, v in st.finish.items()},
    }


def fmt(v):
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def print_table(results, out=sys.stdout):
    hdr = ["N", "req", "req/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
           "E2E p50", "E2E p99", "errors"]
    rows = []
    for r in results:
        errs = ",".join(f"{k}:{v}" for k, v in sorted(r["errors"].items())) or "0"
        rows.append([str(r["concurrency"]), str(r["requests"]), f"{r['requests_per_s']:.2f}",
                     f"{r['tokens_per_s']:.1f}", fmt(r["ttft_ms"]["p50"]), fmt(r["ttft_ms"]["p99"]),
                     fmt(r["itl_ms"]["p50"]), fmt(r["itl_ms"]["p99"]), fmt(r["e2e_ms"]["p50"]),
                     fmt(r["e2e_ms"]["p99"]), errs])
    w = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(hdr)]
    out.write("| " + " | ".join(h.rjust(w[i]) for i, h in enumerate(hdr)) + " |\n")
    out.write("|" + "|".join("-" * (x + 1) + ":" for x in w) + "|\n")
    for row in rows:
        out.write("| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(row)) + " |\n")
    out.write("(latencies in ms; ITL = inter-token latency; req/s and tok/s over the wall time)\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--addr", help="a running decode worker (default: start a local stack)")
    ap.add_argument("--concurrency", default="1,2,4", help="comma-separated levels N")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=300.0, help="deadline of each call, s")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of N=1 load first")
    ap.add_argument("--shared-channel", action="store_true",
                    help="all streams on one channel (HTTP/2 connection)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--bin", default=os.environ.get("IHIP_BIN") or os.path.join(SRC, "build",
                                                                                "bin"))
    ap.add_argument("--model", default=os.environ.get("IHIP_MODEL") or os.path.join(
        SRC, "models", "SmolLM2-135M-Instruct-Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each worker context")
    ap.add_argument("--max-seqs", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024)
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1 or args.max_tokens < 1 or args.prompt_tokens < 1:
        ap.error("concurrency levels, --max-tokens and --prompt-tokens must be >= 1")

    stack = None
    try:
        if args.addr:
            addr = args.addr
        else:
            stack = LocalStack(args.bin, args.model, args.threads, max(args.max_seqs, max(levels)),
                               args.ctx)
            addr = stack.addr
        if not wait_serving(addr, 120):
            print(f"error: {addr} is not SERVING")
            return 1
        ch = grpc.insecure_channel(addr)
        api = Api(ch)
        call, Req = api.method("ModelInfo")
        mi = call(Req(), timeout=10)
        call, Req = api.method("Tokenize")
        base = list(call(Req(text=TEXT * 4), timeout=30).ids)
        ch.close()
        if len(base) < args.prompt_tokens + 64:
            base = base * ((args.prompt_tokens + 64) // len(base) + 1)
        prompts = [base[k:k + args.prompt_tokens] for k in range(0, 64, 4)]
        if args.warmup > 0:
            run_level(addr, args, prompts, 1, args.warmup)
        results = []
        for n in levels:
            r = run_level(addr, args, prompts, n, args.duration)
            results.append(r)
            print(f"N={n}: {r['requests']} requests, {r['tokens_per_s']} tok/s, "
                  f"TTFT p50 {fmt(r['ttft_ms']['p50'])} ms, errors {r['errors'] or 0}", flush=True)
        try:
            load = os.getloadavg()
        except OSError:
            load = None
        out = {"target": args.addr or "local stack", "model": mi.model_name,
               "backend": mi.backend, "version": mi.version,
               "params": {"duration_s": args.duration, "prompt_tokens": args.prompt_tokens,
                          "max_tokens": args.max_tokens, "temperature": args.temperature,
                          "seed": args.seed, "threads": args.threads if stack else None,
                          "shared_channel": args.shared_channel},
               "loadavg": [round(x, 2) for x in load] if load else None,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "levels": results}
        print()
        print(f"Generate load: prompt {args.prompt_tokens} tokens, max_tokens {args.max_tokens}, "
              f"temperature {args.temperature}, {args.duration:g} s per level, model "
              f"{mi.model_name} ({mi.backend}); load average "
              f"{' '.join(f'{x:.2f}' for x in load) if load else '?'}")
        print_table(results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
            print(f"wrote {args.json}")
        return 0
    finally:
        if stack:
            rcs = stack.close()
            if any(rc != 0 for rc in rcs):
                print(f"warning: workers exited with {rcs}")


if __name__ == "__main__":
    sys.exit(main())
