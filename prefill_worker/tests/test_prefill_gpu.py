#!/usr/bin/env python3
"""test_prefill_gpu.py — ihip-prefill-worker --device cuda end to end (needs a GPU and a CUDA
build; exit 77 otherwise). Run by hand on the GPU machine (not a ctest):

    IHIP_BIN=build/bin IHIP_MODEL=models/SmolLM2-135M-Instruct-Q4_1.gguf \
        .venv/bin/python prefill_worker/tests/test_prefill_gpu.py

Uses the worker harness of tests/integration/test_prefill_worker.py (same flags, plus
--device cuda; --kv-create then makes a bf16 segment). Checks:
  * the segment is bf16; a prefill streams progress and a result; its blocks are in the store;
  * the last logits agree with the CPU engine's (libihip; the GPU computes in bf16, so: the CPU's
    top token is among the GPU's top 3 and the logits correlate ≥ 0.999);
  * the stored K/V read back (pf-kv-compare, the decode worker's side) is close to a local CPU
    prefill's cache (bf16 vs f16: max |diff| printed; the bound 1.0 is a guess, not measured);
  * prefix reuse: 256 tokens adopted and bound in place, logits equal (tolerance 2e-3) to a GPU
    recompute of the same prompt without reuse; the prefix blocks are shared, not copied;
  * a per-request HiP override (a new GPU context) and back to dense;
  * cancel mid-prefill leaves no WRITING sequence; SIGTERM exits 0 and leaves the store empty.
"""
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "integration"))
import test_prefill_worker as pf  # noqa: E402  (harness: Worker, Api, kv helpers, check)

grpc, np = pf.grpc, pf.np


def skip(why):
    print(f"skip: {why}")
    print("0 passed, 0 failed")
    sys.exit(77)


def gpu_close(a, b):
    """(ok, max |diff|, corr): the reference's top token among a's top 3 and corr ≥ 0.999."""
    d = float(np.max(np.abs(a - b)))
    corr = float(np.corrcoef(a, b)[0, 1])
    top3 = set(np.argsort(-a)[:3].tolist())
    return int(np.argmax(b)) in top3 and corr >= 0.999, d, corr


def main():
    pf.ihip_ctypes.skip_if_missing()
    if not os.path.exists(pf.WORKER):
        skip(f"{pf.WORKER} not built")
    kv_dir = tempfile.mkdtemp(prefix="ihip-pfgpu-")
    try:
        w = pf.Worker(kv_dir, "--device", "cuda", "--kv-blocks", "4000", "--handoff-ms", "60000")
    except RuntimeError as e:  # a build without CUDA refuses the flag before it listens
        if "no CUDA backend" in str(e):
            shutil.rmtree(kv_dir, ignore_errors=True)
            skip("this build has no CUDA backend")
        raise
    check = pf.check
    try:
        ch = grpc.insecure_channel(w.addr)
        health = pf.health_pb2_grpc.HealthStub(ch)

        def serving():
            try:
                r = health.Check(pf.health_pb2.HealthCheckRequest(service="infinitehip.v1.Prefiller"),
                                 timeout=2)
                return r.status == pf.health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False
        pf.wait_for(lambda: serving() or w.proc.poll() is not None, timeout=180)
        if w.proc.poll() is not None:
            w.stop()  # joins the log reader
            if "no CUDA device" in "".join(w.log):
                subprocess.run([pf.KV, "destroy", pf.KV_NAME, "--dir", kv_dir], capture_output=True)
                shutil.rmtree(kv_dir, ignore_errors=True)
                skip("no CUDA device is visible")
        if not check("health becomes SERVING (GPU)", serving()):
            raise RuntimeError("worker not serving: " + "".join(w.log[-20:]))
        api = pf.Api(ch)
        lib = pf.ihip_ctypes.load()
        eng = pf.ihip_ctypes.Engine(lib, n_ctx=1024, threads=2, chunk=64)
        rng = random.Random(4321)
        n_vocab = eng.n_vocab
        prompt_a = [rng.randrange(1, n_vocab) for _ in range(300)]
        prompt_b = prompt_a[:256] + [rng.randrange(1, n_vocab) for _ in range(50)]
        long_prompt = [rng.randrange(1, n_vocab) for _ in range(640)]
        ref_a = eng.prefill(prompt_a)
        st = pf.kv_stats(kv_dir)
        check("--device cuda --kv-create made a bf16 segment", st["geometry"]["dtype"] == "bf16",
              str(st["geometry"]))

        prog, res, code, det, _ = api.prefill(prompt_a, return_last_logits=True,
                                              no_prefix_reuse=True, progress_interval_ms=1)
        check("GPU Prefill OK", code == grpc.StatusCode.OK, f"{code} {det}")
        if res is None:
            raise RuntimeError("no result: " + "".join(w.log[-20:]))
        check("progress monotonic, in whole blocks",
              prog and all(prog[i].tokens_done <= prog[i + 1].tokens_done
                           for i in range(len(prog) - 1)) and
              all(p.tokens_done % 64 == 0 and p.tokens_total == 300 for p in prog),
              str([p.tokens_done for p in prog]))
        st = pf.kv_stats(kv_dir)
        check("5 token blocks x 30 layers stored", st["blocks"]["used"] == 5 * 30, str(st["blocks"]))
        la = pf.logits_of(res)
        ok, d, corr = gpu_close(la, ref_a)
        check("GPU logits agree with the CPU engine's", ok, f"max diff {d:.4f}, corr {corr:.6f}")
        print(f"     GPU vs CPU logits: max |diff| {d:.4f}, correlation {corr:.6f}")

        # prefix reuse: reference = GPU recompute of B without reuse
        _, res_b0, code, det, _ = api.prefill(prompt_b, return_last_logits=True, no_prefix_reuse=True)
        check("B without reuse OK", code == grpc.StatusCode.OK and res_b0 is not None, f"{code} {det}")
        used0 = pf.kv_stats(kv_dir)["blocks"]["used"]
        prog, res_b, code, det, _ = api.prefill(prompt_b, return_last_logits=True)
        check("B with reuse OK", code == grpc.StatusCode.OK and res_b is not None, f"{code} {det}")
        if res_b is not None and res_b0 is not None:
            check("256 tokens adopted", res_b.handle.n_cached_tokens == 256,
                  str(res_b.handle.n_cached_tokens))
            ok, d = pf.close(pf.logits_of(res_b), pf.logits_of(res_b0))
            check("bound prefix gives the GPU recompute's logits", ok, f"max diff {d}")
            used1 = pf.kv_stats(kv_dir)["blocks"]["used"]
            check("only the new block was written (prefix shared)", used1 - used0 == 1 * 30,
                  f"{used0} -> {used1}")
            tokfile = os.path.join(kv_dir, "tokens-b.bin")
            with open(tokfile, "wb") as f:
                f.write(struct.pack(f"<{len(prompt_b)}i", *prompt_b))
            out = subprocess.run([pf.COMPARE, "--model", pf.MODEL, "--kv-dir", kv_dir,
                                  "--kv-name", pf.KV_NAME, "--seq", str(res_b.handle.sequence_id),
                                  "--gen", str(res_b.handle.generation), "--tokens", tokfile,
                                  "--ctx", "1024", "--chunk", "64"],
                                 capture_output=True, text=True, timeout=120)
            cmp = json.loads(out.stdout) if out.returncode == 0 else {}
            check("stored K/V (bf16, GPU) close to a CPU prefill's cache",
                  cmp.get("layers") == 30 and cmp.get("tokens") == 306 and
                  cmp.get("max_abs_diff", 1e9) <= 1.0, out.stdout + out.stderr)
            print(f"     stored K/V vs CPU cache: {out.stdout.strip()}")

        # a HiP override makes a new GPU context; dense again makes the dense one back
        _, res_h, code, det, _ = api.prefill(prompt_a[:200], attention={"preset": "fast"},
                                             return_last_logits=True, no_prefix_reuse=True)
        check("HiP override on the GPU OK", code == grpc.StatusCode.OK and res_h is not None and
              bool(np.all(np.isfinite(pf.logits_of(res_h)))), f"{code} {det}")
        _, res_a2, code, det, _ = api.prefill(prompt_a, return_last_logits=True, no_prefix_reuse=True)
        check("dense again gives the first logits", code == grpc.StatusCode.OK and
              res_a2 is not None and pf.close(pf.logits_of(res_a2), la)[0], f"{code} {det}")

        got, code = pf.cancel_after_first_progress(api, long_prompt, no_prefix_reuse=True)
        check("cancel mid-prefill: CANCELLED", code == grpc.StatusCode.CANCELLED, str(code))
        check("no WRITING sequence left", pf.wait_for(
            lambda: all(s.get("state") != "writing" for s in pf.kv_ls(kv_dir)), timeout=20))
    finally:
        rc = w.stop()
    check("SIGTERM: exit 0", rc == 0, str(rc))
    st = pf.kv_stats(kv_dir)
    check("store empty after exit", st["blocks"]["used"] == 0, str(st["blocks"]))
    print("".join(l for l in w.log if "GPU" in l or "device" in l)[-2000:])
    subprocess.run([pf.KV, "destroy", pf.KV_NAME, "--dir", kv_dir], capture_output=True)
    shutil.rmtree(kv_dir, ignore_errors=True)
    print(f"{pf.N_PASS} passed, {pf.N_FAIL} failed")
    return 1 if pf.N_FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
