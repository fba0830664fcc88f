#!/usr/bin/env python3
"""test_prefill_worker.py — ihip-prefill-worker end to end on the real model, over loopback.

The worker runs with --kv-create in a private --kv-dir on an ephemeral port; the client is grpcio
with stubs built only from server reflection (no .proto). Checks:
  * health NOT_SERVING → SERVING, the Prefiller service listed by reflection;
  * Prefill streams progress then one result; the handle names the segment, a READY sequence of
    the right token count (ihip-kv ls --json), the model fingerprint; the seed state is
    well-formed (magic, n_past, tokens, CRC-32C);
  * the stored K/V of every layer equals a local prefill's cache, read back by pf-kv-compare with
    its own lease (the decode worker's side of the hand-over);
  * the last-position logits equal those of our engine (libihip.so by ctypes) on the same
    prompt;
  * a second prompt sharing a prefix reports cached tokens > 0 and gives the same logits as a
    full recompute — the reused K/V was loaded from the store, so this checks the stored K/V;
    the same prompt again reuses its prefix and gives the same logits;
  * INVALID_ARGUMENT for an empty prompt and a token id out of range; FAILED_PRECONDITION for
    another model fingerprint; RESOURCE_EXHAUSTED with retry-delay-ms over --max-prompt-tokens
    and over --max-concurrent;
  * cancellation and a deadline mid-prefill leave no WRITING sequence; hand-over leases expire
    after --handoff-ms (no leak when no decode worker comes);
  * SIGTERM mid-prefill: the call ends UNAVAILABLE, exit 0, the store is left empty;
  * a restarted worker attaches to the existing segment; with --max-concurrent 2 two prefills run
    at once and both give the engine's logits;
  * kill -9 mid-prefill, then `ihip-kv gc` frees every block.

Environment: IHIP_BIN (build/bin), IHIP_MODEL; IHIP_PREFILL_BIN overrides the worker's directory. Exit 0 pass, 1 fail, 77 skip.
"""
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model"))
import ihip_ctypes  # noqa: E402

try:
    import grpc
    import numpy as np
    from google.protobuf import descriptor_pool, message_factory
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase
except ImportError as e:
    print(f"skip: grpcio / numpy missing ({e})")
    print("0 passed, 0 failed")
    sys.exit(77)

N_PASS = 0
N_FAIL = 0
BIN = ihip_ctypes.BIN
MODEL = ihip_ctypes.MODEL
# IHIP_PREFILL_BIN overrides the directory of the worker (e.g. an ASan build)
WORKER = os.path.join(os.environ.get("IHIP_PREFILL_BIN") or BIN, "ihip-prefill-worker")
KV = os.path.join(BIN, "ihip-kv")
COMPARE = os.path.join(BIN, "pf-kv-compare")
KV_NAME = "pftest"


def check(name, cond, detail=""):
    global N_PASS, N_FAIL
    if cond:
        N_PASS += 1
        print(f"ok   {name}")
    else:
        N_FAIL += 1
        print(f"FAIL {name} {detail}")
    return cond


class Worker:
    def __init__(self, kv_dir, *extra):
        args = [WORKER, "--model", MODEL, "--kv-create", "--kv-dir", kv_dir, "--kv-name", KV_NAME,
                "--kv-blocks", "600", "--ctx", "2048", "--chunk", "64", "--threads", "2",
                "--attention", "dense", "--max-prompt-tokens", "700", "--max-concurrent", "1",
                "--handoff-ms", "6000", *extra]
        env = dict(os.environ, IHIP_RETRY_DELAY_MS="250")  # the IHIP_* equivalent of a flag
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"worker did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(line.split()[2])
        self.addr = f"127.0.0.1:{self.port}"
        self.log = []
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self._t.join(timeout=5)
        return rc


class Api:
    """Prefill through a stub built from reflection only."""

    def __init__(self, channel):
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)
        svc = self.pool.FindServiceByName("infinitehip.v1.Prefiller")
        m = svc.FindMethodByName("Prefill")
        self.Req = message_factory.GetMessageClass(m.input_type)
        Resp = message_factory.GetMessageClass(m.output_type)
        self.call = channel.unary_stream("/infinitehip.v1.Prefiller/Prefill",
                                         request_serializer=self.Req.SerializeToString,
                                         response_deserializer=Resp.FromString)
        self.services = list(self.db.get_services())

    def prefill(self, tokens, timeout=60, **kw):
        """(progress events, result or None, status code, details, trailers)."""
        req = self.Req(token_ids=tokens, **kw)
        progress, result = [], None
        it = self.call(req, timeout=timeout)
        try:
            for r in it:
                if r.WhichOneof("event") == "progress":
                    progress.append(r.progress)
                else:
                    result = r.result
            return progress, result, grpc.StatusCode.OK, "", dict(it.trailing_metadata() or ())
        except grpc.RpcError as e:
            return progress, result, e.code(), e.details(), dict(e.trailing_metadata() or ())


def _prefill_retry(self, tokens, **kw):
    """prefill, retrying while the worker says RESOURCE_EXHAUSTED (a cancelled prefill holds its
    context until its current chunk ends), as a client honouring retry-delay-ms does."""
    for _ in range(40):
        r = self.prefill(tokens, **kw)
        if r[2] != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return r
        time.sleep(int(r[4].get("retry-delay-ms", "250")) / 1000)
    return r


Api.prefill_retry = _prefill_retry


def kv(*args):
    out = subprocess.run([KV, *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ihip-kv {args}: {out.stderr}")
    return json.loads(out.stdout) if "--json" in args else out.stdout


def kv_ls(kv_dir):
    return kv("ls", KV_NAME, "--dir", kv_dir, "--json")["seqs"]


def kv_stats(kv_dir):
    return kv("stats", KV_NAME, "--dir", kv_dir, "--json")


def wait_for(pred, timeout=10.0, step=0.05):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def logits_of(result):
    return np.frombuffer(result.last_logits, dtype="<f4")


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 & -(c & 1))
    return c ^ 0xFFFFFFFF


def close(a, b, tol=2e-3):
    d = float(np.max(np.abs(a - b)))
    return d <= tol * max(1.0, float(np.max(np.abs(b)))), d


def cancel_after_first_progress(api, tokens, **kw):
    """Start a prefill and cancel it as soon as a progress event arrives."""
    it = api.call(api.Req(token_ids=tokens, progress_interval_ms=1, **kw), timeout=60)
    got = 0
    try:
        for r in it:
            if r.WhichOneof("event") == "progress":
                got += 1
                it.cancel()
    except grpc.RpcError as e:
        return got, e.code()
    return got, grpc.StatusCode.OK


def main():
    ihip_ctypes.skip_if_missing()
    if not os.path.exists(WORKER) or not os.path.exists(KV):
        print(f"skip: {WORKER} or {KV} not built")
        print("0 passed, 0 failed")
        sys.exit(77)
    lib = ihip_ctypes.load()
    eng = ihip_ctypes.Engine(lib, n_ctx=1024, threads=2, chunk=64)
    rng = random.Random(1234)
    n_vocab = eng.n_vocab
    prompt_a = [rng.randrange(1, n_vocab) for _ in range(300)]
    prompt_b = prompt_a[:256] + [rng.randrange(1, n_vocab) for _ in range(50)]
    long_prompt = [rng.randrange(1, n_vocab) for _ in range(640)]

    # references first: the worker's hand-over leases expire after 6 s of wall time
    ref_a = eng.prefill(prompt_a)
    eng.reset()
    ref_b = eng.prefill(prompt_b)
    eng.reset()
    prompt_h = prompt_b[:200]
    ref_h = eng.prefill(prompt_h)

    out = subprocess.run([WORKER, "--help"], capture_output=True, text=True, timeout=10)
    check("--help lists the flags", out.returncode == 0 and "--max-concurrent" in out.stdout and
          "IHIP_" in out.stdout, out.stderr)
    out = subprocess.run([WORKER, "--model", MODEL, "--no-such-flag"], capture_output=True,
                         text=True, timeout=10)
    check("unknown flag: exit 2", out.returncode == 2, str(out.returncode))
    out = subprocess.run([WORKER, "--model", MODEL, "--chunk", "0"], capture_output=True,
                         text=True, timeout=10)
    check("out-of-range value: exit 2", out.returncode == 2 and "chunk" in out.stderr, out.stderr)

    kv_dir = tempfile.mkdtemp(prefix="ihip-pf-")
    w = Worker(kv_dir)
    try:
        ch = grpc.insecure_channel(w.addr)
        health = health_pb2_grpc.HealthStub(ch)

        def serving():
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service="infinitehip.v1.Prefiller"),
                                 timeout=2)
                return r.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False
        check("health becomes SERVING", wait_for(serving, timeout=60))
        api = Api(ch)
        check("reflection lists infinitehip.v1.Prefiller", "infinitehip.v1.Prefiller" in api.services,
              str(api.services))

        # ---- a prefill, its stream, handle and store state ----
        prog, res, code, det, _ = api.prefill(prompt_a, request_id="a", return_last_logits=True,
                                              no_prefix_reuse=True, progress_interval_ms=1)
        check("Prefill OK", code == grpc.StatusCode.OK, f"{code} {det}")
        check("progress events before the result", len(prog) >= 2 and res is not None, str(len(prog)))
        check("progress is monotonic and ends at the total",
              all(p.tokens_total == 300 for p in prog) and
              all(prog[i].tokens_done <= prog[i + 1].tokens_done for i in range(len(prog) - 1)) and
              prog[-1].tokens_done == 300, str([p.tokens_done for p in prog]))
        if res is None:
            raise RuntimeError("no result: " + "".join(w.log[-20:]))
        h = res.handle
        check("handle: tokens, cached 0, block size, segment, fingerprint",
              h.n_tokens == 300 and h.n_cached_tokens == 0 and h.tokens_per_block == 64 and
              h.segment == os.path.join(kv_dir, "ihip-" + KV_NAME) and
              len(h.model_fingerprint) == 16 and h.lease_id != 0, str(h))
        st = kv_stats(kv_dir)
        check("segment geometry from the model", st["geometry"]["n_layers"] == 30 and
              st["geometry"]["n_kv_heads"] == 3 and st["geometry"]["head_dim"] == 64 and
              st["geometry"]["model_fingerprint"] == h.model_fingerprint, str(st["geometry"]))
        seqs = kv_ls(kv_dir)
        mine = [s for s in seqs if s.get("id") == h.sequence_id]
        check("ihip-kv ls: the sequence is READY with 300 tokens",
              len(mine) == 1 and mine[0].get("state") == "ready" and mine[0].get("tokens") == 300,
              json.dumps(seqs))
        check("5 token blocks x 30 layers stored", st["blocks"]["used"] == 5 * 30, str(st["blocks"]))
        sd = res.seed
        data = bytes(sd.data)
        ok_seed = len(data) >= 36 and struct.unpack_from("<II", data, 0) == (0x44534849, 1)
        if ok_seed:
            n_past, n_tok = struct.unpack_from("<QQ", data, 8)
            n_tail = struct.unpack_from("<I", data, 32)[0]
            tail = list(struct.unpack_from(f"<{n_tail}i", data, 36))
            ok_seed = n_past == 300 and n_tok == 300 and tail == prompt_a
        check("seed state: magic, n_past, tokens, crc32c, n_layer",
              ok_seed and sd.crc32c == crc32c(data) and sd.size == len(data) and sd.n_layer == 30 and
              sd.attention_digest == "dense", f"{sd.format_version} {sd.size} {sd.attention_digest}")
        check("timings set", res.prefill_us > 0, str(res.prefill_us))

        la = logits_of(res)
        ok, d = close(la, ref_a)
        check("last logits equal the engine's (libihip ctypes)", la.shape == ref_a.shape and ok, f"max diff {d}")

        # ---- prefix reuse: stored K/V feeds the computation ----
        prog, res_b, code, det, _ = api.prefill(prompt_b, request_id="b", return_last_logits=True)
        check("shared-prefix Prefill OK", code == grpc.StatusCode.OK, f"{code} {det}")
        if res_b is not None:
            check("cached tokens > 0 (256 reused)", res_b.handle.n_cached_tokens == 256,
                  str(res_b.handle.n_cached_tokens))
            check("progress reports the cached tokens", prog and prog[0].cached_tokens == 256,
                  str(prog[:1]))
            ok, d = close(logits_of(res_b), ref_b)
            check("reused prefix gives the same logits as a full recompute", ok, f"max diff {d}")
        st = kv_stats(kv_dir)
        check("prefix blocks are shared, not copied", st["blocks"]["shared"] == 4 * 30 and
              st["blocks"]["used"] == 5 * 30 + 1 * 30, str(st["blocks"]))
        prog, res_a2, code, det, _ = api.prefill(prompt_a, return_last_logits=True)
        check("same prompt again reuses its prefix and gives the same logits",
              code == grpc.StatusCode.OK and res_a2 is not None and
              res_a2.handle.n_cached_tokens == 256 and close(logits_of(res_a2), la)[0],
              f"{code} {det}")

        # the stored K/V itself (of B: adopted prefix blocks + computed ones): read back with its
        # own lease, as a decode worker takes at hand-over, and compared row by row with a local
        # prefill of the same tokens
        check("pf-kv-compare is built", os.path.exists(COMPARE), COMPARE)
        if os.path.exists(COMPARE) and res_b is not None:
            tokfile = os.path.join(kv_dir, "tokens-b.bin")
            with open(tokfile, "wb") as f:
                f.write(struct.pack(f"<{len(prompt_b)}i", *prompt_b))
            out = subprocess.run([COMPARE, "--model", MODEL, "--kv-dir", kv_dir, "--kv-name", KV_NAME,
                                  "--seq", str(res_b.handle.sequence_id), "--gen", str(res_b.handle.generation),
                                  "--tokens", tokfile, "--ctx", "1024", "--chunk", "64"],
                                 capture_output=True, text=True, timeout=120)
            cmp = json.loads(out.stdout) if out.returncode == 0 else {}
            check("stored K/V of layers 0..29 equals a local prefill's cache (bit-exact)",
                  cmp.get("layers") == 30 and cmp.get("tokens") == 306 and
                  cmp.get("k_rows_differ") == 0 and cmp.get("v_rows_differ") == 0,
                  out.stdout + out.stderr)
        # ---- a per-request HiP configuration (the worker default here is dense) ----
        prog, res_h, code, det, _ = api.prefill(prompt_h, attention={"preset": "fast", "using_extend": False},
                                                no_prefix_reuse=True, return_last_logits=True)
        check("HiP prefill (preset fast) OK", code == grpc.StatusCode.OK and res_h is not None and
              res_h.seed.attention_digest.startswith("hip:") and
              len(res_h.seed.steps_to_refresh) == 3, f"{code} {det}")
        _, res_h2, code2, _, _ = api.prefill(prompt_h, attention={"preset": "fast", "using_extend": False},
                                             no_prefix_reuse=True, return_last_logits=True)
        check("HiP prefill is deterministic", res_h is not None and res_h2 is not None and
              np.array_equal(logits_of(res_h), logits_of(res_h2)), str(code2))
        _, res_d, code, det, _ = api.prefill(prompt_h, no_prefix_reuse=True, return_last_logits=True)
        ok, d = close(logits_of(res_d), ref_h) if res_d is not None else (False, None)
        check("back to the dense default after a HiP request (logits = engine)", ok and
              res_d.seed.attention_digest == "dense", f"{code} {det} max diff {d}")

        # ---- statuses ----
        _, _, code, det, _ = api.prefill([])
        check("empty prompt: INVALID_ARGUMENT", code == grpc.StatusCode.INVALID_ARGUMENT, f"{code} {det}")
        _, _, code, det, _ = api.prefill([1, 2, n_vocab])
        check("token id out of range: INVALID_ARGUMENT", code == grpc.StatusCode.INVALID_ARGUMENT,
              f"{code} {det}")
        _, _, code, det, _ = api.prefill([1, 2, 3], kv_segment="/dev/shm/ihip-elsewhere")
        check("another KV segment: FAILED_PRECONDITION",
              code == grpc.StatusCode.FAILED_PRECONDITION, f"{code} {det}")
        _, res_n, code, det, _ = api.prefill([1, 2, 3], kv_segment=KV_NAME,
                                             model_fingerprint=h.model_fingerprint)
        check("matching segment name and fingerprint: OK", code == grpc.StatusCode.OK, f"{code} {det}")
        _, _, code, det, _ = api.prefill([1, 2, 3], model_fingerprint="0123456789abcdef")
        check("other model fingerprint: FAILED_PRECONDITION",
              code == grpc.StatusCode.FAILED_PRECONDITION, f"{code} {det}")
        _, _, code, det, _ = api.prefill([1, 2, 3], attention={"preset": "nope"})
        check("unknown attention preset: INVALID_ARGUMENT", code == grpc.StatusCode.INVALID_ARGUMENT,
              f"{code} {det}")
        _, _, code, det, tr = api.prefill([5] * 701)
        check("over --max-prompt-tokens: RESOURCE_EXHAUSTED + retry-delay-ms",
              code == grpc.StatusCode.RESOURCE_EXHAUSTED and tr.get("retry-delay-ms") == "250",
              f"{code} {det} {tr}")

        # (the reservation is clamped to the context: 100 + 1948 tokens = 960 blocks > 600)
        _, _, code, det, tr = api.prefill_retry([5] * 100, reserve_decode_tokens=100000)
        check("KV store too full for reserve_decode_tokens: RESOURCE_EXHAUSTED + retry-delay-ms",
              code == grpc.StatusCode.RESOURCE_EXHAUSTED and tr.get("retry-delay-ms") == "250" and
              "KV store full" in det, f"{code} {det} {tr}")
        check("a refused prefill leaves no WRITING sequence",
              all(s.get("state") != "writing" for s in kv_ls(kv_dir)), json.dumps(kv_ls(kv_dir)))

        # over --max-concurrent: a second call while one runs
        first = {}
        started = threading.Event()

        def run_long():
            it = api.call(api.Req(token_ids=long_prompt, no_prefix_reuse=True, progress_interval_ms=1),
                          timeout=60)
            try:
                for r in it:
                    started.set()
                    if r.WhichOneof("event") == "result":
                        first["result"] = r.result
                first["code"] = grpc.StatusCode.OK
            except grpc.RpcError as e:
                first["code"] = e.code()
            started.set()
        t = threading.Thread(target=run_long)
        t.start()
        started.wait(30)
        _, _, code, det, tr = api.prefill([7] * 10)
        check("over --max-concurrent: RESOURCE_EXHAUSTED + retry-delay-ms",
              code == grpc.StatusCode.RESOURCE_EXHAUSTED and tr.get("retry-delay-ms") == "250",
              f"{code} {det} {tr}")
        t.join(60)
        check("the running prefill is unaffected", first.get("code") == grpc.StatusCode.OK and
              first.get("result") is not None and first["result"].handle.n_tokens == 640, str(first.get("code")))

        # ---- cancellation and deadline leave nothing WRITING ----
        def no_writing():
            return all(s.get("state") != "writing" for s in kv_ls(kv_dir))
        got, code = cancel_after_first_progress(api, long_prompt[:600] + [9] * 10, no_prefix_reuse=True)
        check("client cancel mid-prefill", got >= 1 and code == grpc.StatusCode.CANCELLED, f"{got} {code}")
        check("cancel: no WRITING sequence left", wait_for(no_writing), json.dumps(kv_ls(kv_dir)))
        _, _, code, det, _ = api.prefill_retry(long_prompt[:600] + [11] * 10, timeout=0.3,
                                               no_prefix_reuse=True)
        check("deadline mid-prefill: DEADLINE_EXCEEDED", code == grpc.StatusCode.DEADLINE_EXCEEDED,
              f"{code} {det}")
        check("deadline: no WRITING sequence left", wait_for(no_writing), json.dumps(kv_ls(kv_dir)))
        prog, res_ok, code, det, _ = api.prefill_retry([3] * 20)
        check("the worker still serves after cancellations", code == grpc.StatusCode.OK, f"{code} {det}")

        # ---- hand-over: leases expire after --handoff-ms when no decode worker comes ----
        check("hand-over leases expire: every sequence freed",
              wait_for(lambda: kv_ls(kv_dir) == [], timeout=25), json.dumps(kv_ls(kv_dir)))
        st = kv_stats(kv_dir)
        check("hand-over expiry: no block used, no lease", st["blocks"]["used"] == 0 and st["leases"] == 0,
              f'{st["blocks"]} leases {st["leases"]}')
        if N_FAIL:
            print("".join(w.log[-30:]))

        # ---- SIGTERM mid-prefill ----
        box = {}

        def run_term():
            box["r"] = api.prefill(long_prompt, no_prefix_reuse=True, progress_interval_ms=1)
        t = threading.Thread(target=run_term)
        t.start()
        time.sleep(0.3)
        rc = w.stop(signal.SIGTERM)
        t.join(30)
        check("SIGTERM: exit 0", rc == 0, str(rc))
        code = box.get("r", (None, None, None))[2]
        check("SIGTERM mid-prefill: the call ends with a status (UNAVAILABLE)",
              code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), str(code))
        st = kv_stats(kv_dir)
        check("SIGTERM: store left empty", st["blocks"]["used"] == 0 and st["seqs"]["writing"] == 0 and
              st["seqs"]["ready"] == 0, str(st["seqs"]))
        ch.close()

        # ---- kill -9 mid-prefill, then ihip-kv gc ----
        w = Worker(kv_dir, "--max-concurrent", "2", "--threads", "1")
        ch = grpc.insecure_channel(w.addr)
        health = health_pb2_grpc.HealthStub(ch)
        check("restarted worker serves on the existing segment", wait_for(serving, timeout=60))
        api = Api(ch)
        # two prefills at once, one context each
        both = {}

        def run_one(key, toks):
            both[key] = api.prefill(toks, request_id=key, no_prefix_reuse=True,
                                    return_last_logits=True)
        ts = [threading.Thread(target=run_one, args=("a", prompt_a)),
              threading.Thread(target=run_one, args=("b", prompt_b))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        ok2 = all(k in both and both[k][2] == grpc.StatusCode.OK and both[k][1] is not None
                  for k in ("a", "b"))
        check("two concurrent prefills (--max-concurrent 2) both OK", ok2,
              str({k: v[2] for k, v in both.items()}))
        if ok2:
            check("concurrent prefills give the engine's logits",
                  close(logits_of(both["a"][1]), ref_a)[0] and close(logits_of(both["b"][1]), ref_b)[0])
        seen = threading.Event()

        def run_kill():
            it = api.call(api.Req(token_ids=long_prompt, no_prefix_reuse=True, progress_interval_ms=1),
                          timeout=60)
            try:
                for r in it:
                    if r.WhichOneof("event") == "progress" and r.progress.tokens_done > 0:
                        seen.set()
            except grpc.RpcError:
                pass
            seen.set()
        t = threading.Thread(target=run_kill)
        t.start()
        seen.wait(30)
        w.proc.kill()
        w.proc.wait()
        t.join(30)
        st = kv_stats(kv_dir)
        check("kill -9 mid-prefill leaves a WRITING sequence", st["seqs"]["writing"] == 1 and
              st["blocks"]["used"] > 0, str(st["seqs"]))
        g = kv("gc", KV_NAME, "--dir", kv_dir, "--json")
        st = kv_stats(kv_dir)
        check("ihip-kv gc frees everything", st["blocks"]["used"] == 0 and st["seqs"]["writing"] == 0 and
              st["seqs"]["ready"] == 0 and st["leases"] == 0, f'{st["blocks"]} {st["seqs"]} {g.get("gc")}')
        out = subprocess.run([KV, "check", KV_NAME, "--dir", kv_dir], capture_output=True, text=True)
        check("ihip-kv check: consistent", out.returncode == 0, out.stdout + out.stderr)
        ch.close()
    finally:
        if w.proc.poll() is None:
            w.stop()
        eng.close()
        shutil.rmtree(kv_dir, ignore_errors=True)
    if N_FAIL:
        print("worker log tail:\n" + "".join(w.log[-20:]))
    print(f"{N_PASS} passed, {N_FAIL} failed")
    return 1 if N_FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
