#!/usr/bin/env python3
"""test_load_smoke.py — a short run of the load benchmark (tests/bench/load/load.py): it starts
its own stack (prefill + decode worker, real model), runs N=2 streams for ~5 s with 8-token
answers, and the output must be sane: a table, JSON with requests > 0 and no errors, tokens/s
consistent with the counts, 0 < TTFT p50 <= TTFT p99, TTFT p50 <= end-to-end p50, inter-token
latency > 0, every request ended by LENGTH or EOS, and the workers exited 0.

Environment: IHIP_BIN, IHIP_MODEL, IHIP_SRC. Exit 0 pass, 1 fail, 77 skip.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("IHIP_SRC") or os.path.abspath(os.path.join(HERE, "..", ".."))
BIN = os.environ.get("IHIP_BIN") or os.path.join(SRC, "build", "bin")
MODEL = os.environ.get("IHIP_MODEL") or os.path.join(SRC, "models",
                                                      "SmolLM2-135M-Instruct-Q4_1.gguf")
N_PASS = N_FAIL = 0


def check(name, cond, detail=""):
    global N_PASS, N_FAIL
    if cond:
        N_PASS += 1
        print(f"ok   {name}", flush=True)
    else:
        N_FAIL += 1
        print(f"FAIL {name} {detail}", flush=True)
    return cond


def main():
    try:
        import grpc  # noqa: F401
    except ImportError as e:
        print(f"skip: grpcio missing ({e})\n0 passed, 0 failed")
        return 77
    for b in ("ihip-decode-worker", "ihip-prefill-worker"):
        if not os.path.exists(os.path.join(BIN, b)):
            print(f"skip: {b} not built in {BIN}\n0 passed, 0 failed")
            return 77
    if not os.path.exists(MODEL):
        print(f"skip: no model at {MODEL}\n0 passed, 0 failed")
        return 77
    with tempfile.TemporaryDirectory(prefix="ihip-load-smoke-") as d:
        out = os.path.join(d, "load.json")
        p = subprocess.run([sys.executable, os.path.join(SRC, "tests", "bench", "load", "load.py"),
                            "--concurrency", "2", "--duration", "5", "--max-tokens", "8",
                            "--prompt-tokens", "12", "--warmup", "0", "--seed", "1",
                            "--temperature", "0.7", "--json", out, "--bin", BIN, "--model", MODEL],
                           capture_output=True, text=True, timeout=300)
        print(p.stdout[-3000:])
        if not check("load.py exits 0", p.returncode == 0, p.stderr[-3000:]):
            print(f"{N_PASS} passed, {N_FAIL} failed")
            return 1
        check("it prints the table", "| N |" in p.stdout and "TTFT p50" in p.stdout)
        check("the workers exited 0", "warning: workers exited" not in p.stdout)
        with open(out) as f:
            res = json.load(f)
    lv = res["levels"]
    check("one level, N=2", len(lv) == 1 and lv[0]["concurrency"] == 2, str(lv))
    r = lv[0]
    check("requests completed, no errors", r["requests"] >= 2 and not r["errors"], str(r))
    check("wall time covers the duration (>= 5 s, < 60 s)", 5.0 <= r["wall_s"] < 60, str(r))
    check("tokens: between 1 and 8 per request", r["requests"] <= r["tokens"] <= 8 * r["requests"],
          str(r))
    check("tokens/s and requests/s agree with the counts",
          abs(r["tokens_per_s"] - r["tokens"] / r["wall_s"]) < 0.1 and
          abs(r["requests_per_s"] - r["requests"] / r["wall_s"]) < 0.01, str(r))
    check("prompt tokens: 12 per request", r["prompt_tokens"] == 12 * r["requests"], str(r))
    t, i, e = r["ttft_ms"], r["itl_ms"], r["e2e_ms"]
    check("0 < TTFT p50 <= TTFT p99", 0 < t["p50"] <= t["p99"], str(t))
    check("TTFT p50 <= end-to-end p50 <= end-to-end p99", t["p50"] <= e["p50"] <= e["p99"],
          f"{t} {e}")
    check("0 < inter-token p50 <= p99", i["p50"] is not None and 0 < i["p50"] <= i["p99"], str(i))
    check("server-side TTFT reported and below the client's p99",
          r["server_ttft_ms_p50"] is not None and 0 < r["server_ttft_ms_p50"] <= t["p99"], str(r))
    check("every request finished by LENGTH (3) or EOS (1)",
          set(r["finish_reasons"]) <= {"1", "3"} and
          sum(r["finish_reasons"].values()) == r["requests"], str(r["finish_reasons"]))
    check("load average recorded", res["loadavg"] is not None and len(res["loadavg"]) == 3)
    print(f"{N_PASS} passed, {N_FAIL} failed")
    return 1 if N_FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
