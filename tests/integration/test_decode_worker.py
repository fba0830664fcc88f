#!/usr/bin/env python3
"""test_decode_worker.py — the decode worker end to end: real ihip-prefill-worker and
ihip-decode-worker processes sharing a kvstore segment in a temporary --kv-dir, on ephemeral
loopback ports, driven by a grpcio client that knows our API only through reflection
(tests/clients/python/client.py).

Checks: health SERVING once loaded and reflection lists our services; ModelInfo; Tokenize equals
`ihip tokenize`; Generate at temperature 0 streams the text of `ihip generate --temp 0
--attention hip` (same attention; also with the "dense" preset, with token-id prompts, with a
3-block prompt and its prefix-cached rerun), with one token id per generated token, usage and
timings; GenerateStream uploads (text / token chunks, kind mix and order errors); same seed at
temperature > 0 gives the same tokens twice; two concurrent requests interleave and each gives
the tokens it gives alone; stop strings end the text before them; cancellation mid-stream stops
the sequence (Admin.GetStats) and its lease is released (`ihip-kv stats`); deadline exceeded
(during prefill and mid-decode); INVALID_ARGUMENT cases; RESOURCE_EXHAUSTED with retry-delay-ms
(too many sequences, prompt over the limit); kill -9 of the prefill worker gives UNAVAILABLE and
a restart on the same port brings success back; round robin skips a dead prefill worker;
--prefill-logits 0 (last prompt token decoded on the decode side) gives the same text; a cancel
during a slow prefill reaches the prefill worker at once; kill -9 of the prefill worker
mid-prefill gives UNAVAILABLE; SIGTERM of the decode worker ends a live stream with
UNAVAILABLE/CANCELLED and releases its lease; kill -9 of the decode worker mid-stream, then
`ihip-kv gc` reclaims every block.

Environment: IHIP_BIN (build/bin), IHIP_MODEL. Exit 0 pass, 1 fail, 77 skip (no model,
no binaries, or grpcio missing).
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import stack  # noqa: E402
from stack import BIN, MODEL, SRC, check, free_port, wait_for  # noqa: E402,F401
sys.path.insert(0, os.path.join(SRC, "tests", "clients", "python"))

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from client import Api, collect, list_services
except ImportError as e:
    print(f"skip: grpcio / grpcio-health-checking / grpcio-reflection missing ({e})")
    print("0 passed, 0 failed")
    sys.exit(77)

SC = grpc.StatusCode
THREADS = "1"


class Worker(stack.Worker):
    """stack.Worker with this file's shorter waits (60 s to SERVING, 30 s to stop)."""

    def wait_serving(self, timeout=60):
        return super().wait_serving(timeout)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        return super().stop(sig, timeout)


class Stack:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ihip-dw-")
        self.pport = free_port()
        self.prefill = None
        self.decode = None

    def start_prefill(self):
        self.prefill = Worker("ihip-prefill-worker", [
            "--model", MODEL, "--listen", f"127.0.0.1:{self.pport}", "--kv-dir", self.dir,
            "--kv-create", "--kv-blocks", "512", "--threads", THREADS, "--handoff-ms", "300",
            "--max-concurrent", "2", "--ctx", "2048"])
        return self.prefill

    def start_decode(self, *extra):
        self.decode = Worker("ihip-decode-worker", [
            "--model", MODEL, "--prefill", f"127.0.0.1:{self.pport}", "--kv-dir", self.dir,
            "--kv-blocks", "512", "--threads", THREADS, "--ctx", "1024", "--max-seqs", "3",
            "--max-prompt-tokens", "512", "--health-timeout-ms", "500",
            # lease counts are checked here; retention is tested in test_decode_append.py
            "--kv-retain", "none", *extra])
        return self.decode

    def kv(self, cmd):
        r = subprocess.run([os.path.join(BIN, "ihip-kv"), cmd, "ihip", "--dir", self.dir,
                            "--json"], capture_output=True, text=True, timeout=30)
        return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr}

    def close(self):
        for w in (self.decode, self.prefill):
            if w:
                w.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def reference(prompt, n=16, attention="hip"):
    r = subprocess.run([os.path.join(BIN, "ihip"), "generate", "-m", MODEL, "-p", prompt, "-n",
                        str(n), "--temp", "0", "--attention", attention, "-t", THREADS, "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout


def rpc_error(fn):
    try:
        fn()
        return None, None, None
    except grpc.RpcError as e:
        md = {k: v for k, v in (e.trailing_metadata() or ())}
        return e.code(), e.details(), md


GREEDY = {"temperature": 0.0}
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):"]


# ---- tests ---------------------------------------------------------------------------------------

def test_basics(st, api, ch):
    names = list_services(ch)
    check("reflection lists Generator, Admin, Health, reflection",
          {"infinitehip.v1.Generator", "infinitehip.v1.Admin", "grpc.health.v1.Health",
           "grpc.reflection.v1.ServerReflection"} <= set(names), str(names))
    call, Req = api.method("ModelInfo")
    mi = call(Req(), timeout=10)
    check("ModelInfo: 30 layers, vocab 49152, 3 KV heads, fingerprint",
          mi.n_layer == 30 and mi.n_vocab == 49152 and mi.n_head_kv == 3 and
          len(mi.fingerprint) == 16 and mi.max_prompt_tokens == 512, str(mi)[:300])
    check("ModelInfo: EOG ids and attention presets", len(mi.eog_ids) >= 1 and
          "fast" in mi.attention_presets and mi.default_attention_preset == "fast")
    call, Req = api.method("Tokenize")
    tk = call(Req(text=PROMPTS[1], with_pieces=True), timeout=10)
    ref = subprocess.run([os.path.join(BIN, "ihip"), "tokenize", "-m", MODEL, "-p", PROMPTS[1]],
                         capture_output=True, text=True, timeout=60).stdout.split()
    check("Tokenize equals `ihip tokenize`", list(tk.ids) == [int(x) for x in ref],
          f"{list(tk.ids)} vs {ref}")
    check("Tokenize pieces join to the text",
          b"".join(tk.pieces).decode() == PROMPTS[1], repr(b"".join(tk.pieces)))


def test_greedy_equals_cli(st, api):
    for p in PROMPTS[:2]:
        want = reference(p)
        text, ids, fin, n_prog = collect(api.generate(prompt=p, max_tokens=16, sampling=GREEDY,
                                                      timeout=120))
        check(f"greedy Generate equals `ihip generate --attention hip` ({p[:20]!r})",
              text == want, f"\n  got  {text!r}\n  want {want!r}")
        check("one token id per generated token; usage and finish reason",
              fin is not None and len(ids) == fin.usage.generated_tokens and
              (len(ids) == 16 or fin.reason == 1) and fin.usage.prompt_tokens >= 5,
              f"{ids} {fin}")
        check("timings: ttft, prefill, per-token, total", fin.timings.ttft_us > 0 and
              fin.timings.prefill_us > 0 and fin.timings.total_us >= fin.timings.ttft_us and
              fin.timings.per_token_us > 0, str(fin.timings))
        check("progress messages before the pieces", n_prog >= 1, str(n_prog))
        # The same prompt given as token ids (no BOS for this model) gives the same text.
    text, _, _, _ = collect(api.generate(prompt=PROMPTS[2], max_tokens=16, sampling=GREEDY,
                                         attention={"preset": "dense"}, timeout=120))
    want = reference(PROMPTS[2], attention="dense")
    check("attention preset 'dense' equals `ihip generate --attention dense`", text == want,
          f"\n  got  {text!r}\n  want {want!r}")
    call, Req = api.method("Tokenize")
    ids = list(call(Req(text=PROMPTS[0]), timeout=10).ids)
    text, _, _, _ = collect(api.generate(tokens=ids, max_tokens=16, sampling=GREEDY, timeout=120))
    check("a token-id prompt gives the same text as the text prompt",
          text == reference(PROMPTS[0]), repr(text))


LONG = ("The history of the city goes back many centuries. " * 12 +
        "Travellers who came to the market in the old square said that")


def test_long_prompt(st, api):
    """A prompt of several KV blocks (64 tokens each): paging across blocks, and the same
    prompt again right away (its K/V may come from the store's prefix, usage.cached_tokens)."""
    want = reference(LONG, n=8)
    a = collect(api.generate(prompt=LONG, max_tokens=8, sampling=GREEDY, timeout=120))
    check("a 3-block prompt equals `ihip generate`", a[0] == want and a[2].usage.prompt_tokens > 128,
          f"\n  got  {a[0]!r}\n  want {want!r} {a[2].usage if a[2] else None}")
    b = collect(api.generate(prompt=LONG, max_tokens=8, sampling=GREEDY, timeout=120))
    check("the same prompt again gives the same text", b[0] == want,
          f"{b[0]!r} cached {b[2].usage.cached_tokens if b[2] else None}")
    print(f"     (second run: {b[2].usage.cached_tokens} cached prompt tokens)")


def test_seed(st, api):
    s = {"temperature": 0.9, "seed": 1234, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    a = collect(api.generate(prompt=PROMPTS[2], max_tokens=16, sampling=s, timeout=120))
    b = collect(api.generate(prompt=PROMPTS[2], max_tokens=16, sampling=s, timeout=120))
    check("same seed at temperature 0.9 gives the same tokens twice", a[1] == b[1] and a[1],
          f"{a[1]} vs {b[1]}")
    s2 = dict(s, seed=99)
    c = collect(api.generate(prompt=PROMPTS[2], max_tokens=16, sampling=s2, timeout=120))
    check("another seed gives other tokens", c[1] != a[1], f"{c[1]}")


def test_concurrent(st, api):
    alone = {}
    for p in PROMPTS[:2]:
        alone[p] = collect(api.generate(prompt=p, max_tokens=24, sampling=GREEDY, timeout=120))[1]
    res, times = {}, {}

    def run(p):
        t_first, t_end = None, None
        ids = []
        for r in api.generate(prompt=p, max_tokens=24, sampling=GREEDY, timeout=120):
            if r.WhichOneof("event") == "piece":
                if t_first is None:
                    t_first = time.monotonic()
                ids.extend(r.piece.token_ids)
        t_end = time.monotonic()
        res[p], times[p] = ids, (t_first, t_end)
    ths = [threading.Thread(target=run, args=(p,)) for p in PROMPTS[:2]]
    for t in ths:
        t.start()
    for t in ths:
        t.join(timeout=180)
    for p in PROMPTS[:2]:
        check(f"concurrent request gives the same tokens as alone ({p[:20]!r})",
              res.get(p) == alone[p], f"{res.get(p)} vs {alone[p]}")
    a, b = (times.get(p) for p in PROMPTS[:2])
    check("two concurrent streams interleave (each starts before the other ends)",
          a and b and a[0] < b[1] and b[0] < a[1], str(times))


def test_stop(st, api):
    full = reference(PROMPTS[0])
    word = "United"
    if word not in full:
        check("stop string test needs the reference text to contain it", False, repr(full))
        return
    text, ids, fin, _ = collect(api.generate(prompt=PROMPTS[0], max_tokens=16, sampling=GREEDY,
                                             stop=[word], timeout=120))
    check("stop string: text ends right before it, reason STOP_STRING",
          text == full[:full.index(word)] and fin.reason == 2 and fin.stop_string == word,
          f"{text!r} {fin.reason} {fin.stop_string!r}")


def test_generate_stream(st, api):
    call, Req = api.method("GenerateStream")
    Hdr, Chunk = api.cls("infinitehip.v1.GenerateRequest"), api.cls("infinitehip.v1.PromptChunk")

    def upload(header, chunks):
        msgs = [Req(header=header)] + [Req(chunk=c) for c in chunks]
        return collect(call(iter(msgs), timeout=120))
    p = PROMPTS[1]
    h = Hdr(max_tokens=16)
    h.sampling.temperature = 0.0
    h.text = p[:7]
    text, ids, fin, _ = upload(h, [Chunk(text=p[7:15]), Chunk(text=p[15:])])
    check("GenerateStream: a text prompt in 3 parts gives the Generate answer",
          text == reference(p) and fin is not None, repr(text))
    tok_call, TReq = api.method("Tokenize")
    pids = list(tok_call(TReq(text=p), timeout=10).ids)
    h = Hdr(max_tokens=16)
    h.sampling.temperature = 0.0
    c1, c2 = Chunk(), Chunk()
    c1.tokens.ids.extend(pids[:3])
    c2.tokens.ids.extend(pids[3:])
    text2, _, _, _ = upload(h, [c1, c2])
    check("GenerateStream: token chunks after an empty header give the same answer",
          text2 == text, repr(text2))
    h = Hdr(max_tokens=4)
    h.text = "abc"
    code, det, _ = rpc_error(lambda: upload(h, [c1]))
    check("GenerateStream: a token chunk after a text header is INVALID_ARGUMENT",
          code == SC.INVALID_ARGUMENT, f"{code} {det}")
    code, det, _ = rpc_error(lambda: collect(call(iter([Req(chunk=Chunk(text="x"))]),
                                                  timeout=30)))
    check("GenerateStream: a chunk before the header is INVALID_ARGUMENT",
          code == SC.INVALID_ARGUMENT, f"{code} {det}")
    code, det, _ = rpc_error(lambda: upload(Hdr(max_tokens=4), []))
    check("GenerateStream: an empty upload is INVALID_ARGUMENT", code == SC.INVALID_ARGUMENT,
          f"{code} {det}")


def leases(st):
    return st.kv("stats").get("leases")


def test_cancel(st, api):
    before = api.stats().get("decode.sequences_cancelled", 0)
    stream = api.generate(prompt=PROMPTS[1], max_tokens=400, sampling=GREEDY, timeout=120)
    n = 0
    for r in stream:
        if r.WhichOneof("event") == "piece":
            n += 1
            if n == 3:
                break
    stream.cancel()
    check("the worker notices the cancel and drops the sequence",
          wait_for(lambda: api.stats().get("decode.sequences_cancelled", 0) > before, 10),
          str(api.stats()))
    check("the sequence stopped early (tokens generated < 100)",
          api.stats().get("decode.sequences_active") == 0)
    check("its lease is released (ihip-kv stats: leases back to 0)",
          wait_for(lambda: leases(st) == 0, 10), str(st.kv("stats")))


def test_deadline(st, api):
    code, _, _ = rpc_error(lambda: collect(api.generate(prompt=PROMPTS[1], max_tokens=400,
                                                        sampling=GREEDY, timeout=0.05)))
    check("deadline of 50 ms: DEADLINE_EXCEEDED", code == SC.DEADLINE_EXCEEDED, str(code))
    code, _, _ = rpc_error(lambda: collect(api.generate(prompt=PROMPTS[1], max_tokens=400,
                                                        sampling=GREEDY, timeout=1.0)))
    check("deadline of 1 s mid-decode: DEADLINE_EXCEEDED", code == SC.DEADLINE_EXCEEDED, str(code))
    check("after deadlines: no sequence left, leases back to 0",
          wait_for(lambda: api.stats().get("decode.sequences_admitted") == 0 and
                   leases(st) == 0, 10), str(api.stats()))


def test_invalid(st, api):
    cases = [
        ("empty text prompt", dict(prompt="")),
        ("no prompt", dict()),
        ("empty token prompt", dict(tokens=[])),
        ("temperature NaN", dict(prompt="hi", sampling={"temperature": math.nan})),
        ("temperature negative", dict(prompt="hi", sampling={"temperature": -1.0})),
        ("temperature > 100", dict(prompt="hi", sampling={"temperature": 1000.0})),
        ("top_p 0", dict(prompt="hi", sampling={"top_p": 0.0})),
        ("min_p 1", dict(prompt="hi", sampling={"min_p": 1.0})),
        ("top_k negative", dict(prompt="hi", sampling={"top_k": -3})),
        ("repeat_penalty < 1", dict(prompt="hi", sampling={"repeat_penalty": 0.5})),
        ("max_tokens over the limit", dict(prompt="hi", max_tokens=10 ** 6)),
        ("token id out of range", dict(tokens=[1, 2, 49152])),
        ("negative token id", dict(tokens=[-1])),
        ("unknown attention preset", dict(prompt="hi", attention={"preset": "sparse"})),
        ("config_json that is a path", dict(prompt="hi", attention={"config_json": "/etc/passwd"})),
        ("config_json with an unknown key", dict(prompt="hi",
                                                 attention={"config_json": '{"nope": 1}'})),
        ("empty stop string", dict(prompt="hi", stop=[""])),
        ("17 stop strings", dict(prompt="hi", stop=[f"s{i}" for i in range(17)])),
        ("request_id not printable", dict(prompt="hi", request_id="a\tb")),
    ]
    for name, kw in cases:
        code, det, _ = rpc_error(lambda: collect(api.generate(timeout=30, **kw)))
        check(f"INVALID_ARGUMENT: {name}", code == SC.INVALID_ARGUMENT, f"{code} {det}")
    # An unknown enum value in a field the worker does not read is ignored (open enums), and an
    # unknown field number too: the request still works.
    check("after bad requests nothing is admitted", api.stats().get("decode.sequences_admitted")
          == 0)


def test_exhausted(st, api):
    code, det, md = rpc_error(lambda: collect(api.generate(prompt="word " * 600, max_tokens=4,
                                                           timeout=30)))
    check("prompt over --max-prompt-tokens: RESOURCE_EXHAUSTED with retry-delay-ms",
          code == SC.RESOURCE_EXHAUSTED and "retry-delay-ms" in md, f"{code} {det} {md}")
    streams = [api.generate(prompt=PROMPTS[i % 3], max_tokens=400, sampling=GREEDY, timeout=120)
               for i in range(3)]
    firsts = [next(s) for s in streams]  # each got admitted (a Progress message)
    code, det, md = rpc_error(lambda: collect(api.generate(prompt="hi", max_tokens=4,
                                                           timeout=30)))
    check("a 4th sequence with --max-seqs 3: RESOURCE_EXHAUSTED with retry-delay-ms",
          code == SC.RESOURCE_EXHAUSTED and md.get("retry-delay-ms") == "500",
          f"{code} {det} {md} {firsts}")
    for s in streams:
        s.cancel()
    check("cancelled streams free their slots", wait_for(
        lambda: api.stats().get("decode.sequences_admitted") == 0, 15), str(api.stats()))
    text, _, fin, _ = collect(api.generate(prompt="hi", max_tokens=4, sampling=GREEDY, timeout=60))
    check("and a new request is admitted again", fin is not None and fin.usage.generated_tokens
          >= 1)


def test_prefill_crash(st, api):
    st.prefill.stop(signal.SIGKILL)
    code, det, _ = rpc_error(lambda: collect(api.generate(prompt=PROMPTS[0], max_tokens=4,
                                                          timeout=30)))
    check("prefill worker killed (-9): UNAVAILABLE", code == SC.UNAVAILABLE, f"{code} {det}")
    st.start_prefill()
    check("restarted prefill worker is SERVING", st.prefill.wait_serving())

    def ok():
        try:
            return collect(api.generate(prompt=PROMPTS[0], max_tokens=4, sampling=GREEDY,
                                        timeout=60))[2] is not None
        except grpc.RpcError:
            return False
    check("after the restart the next request succeeds", wait_for(ok, 20, 0.5))
    # The killed worker's hand-over leases die with it: gc reaps them.
    g = st.kv("gc")
    check("ihip-kv gc reaps the killed prefill worker", g.get("gc", {}).get("owners_reaped") == 1,
          str(g.get("gc")))
    check("then no lease is left", wait_for(lambda: leases(st) == 0, 10), str(st.kv("stats")))


def test_round_robin(st):
    """A dead address first in --prefill: health-aware round robin skips it. This worker also
    runs with --prefill-logits 0: it pages n-1 prompt tokens and decodes the last one itself."""
    dead = f"127.0.0.1:{free_port()}"
    dec = Worker("ihip-decode-worker", [
        "--model", MODEL, "--prefill", f"{dead},127.0.0.1:{st.pport}", "--kv-dir", st.dir,
        "--threads", THREADS, "--ctx", "256", "--health-timeout-ms", "300",
        "--prefill-logits", "0"])
    try:
        check("decode worker with a dead and a live prefill worker is SERVING", dec.wait_serving())
        ch = grpc.insecure_channel(dec.addr)
        api = Api(ch)
        fins = [collect(api.generate(prompt=PROMPTS[0], max_tokens=2, sampling=GREEDY,
                                     timeout=60))[2] for _ in range(3)]
        check("every request succeeds: the dead worker is skipped", all(fins))
        check("stats count no UNAVAILABLE", api.stats().get("decode.prefill_unavailable") == 0)
        text = collect(api.generate(prompt=PROMPTS[1], max_tokens=16, sampling=GREEDY,
                                    timeout=120))[0]
        check("--prefill-logits 0 (last prompt token decoded here) gives the same text",
              text == reference(PROMPTS[1]), repr(text))
        ch.close()
    finally:
        check("it exits 0 on SIGTERM", dec.stop() == 0)


def test_slow_prefill(st):
    """A prefill worker with small chunks (a 450-token prompt takes seconds): a client cancel
    while it works makes the decode worker cancel its Prefill call at once, the prefill worker
    abandons the WRITING sequence and is free again; then a kill -9 of that prefill worker
    mid-prefill gives UNAVAILABLE and gc frees what it was writing."""
    pport = free_port()
    pre = Worker("ihip-prefill-worker", [
        "--model", MODEL, "--listen", f"127.0.0.1:{pport}", "--kv-dir", st.dir,
        "--threads", THREADS, "--chunk", "32", "--ctx", "1024", "--handoff-ms", "300"])
    dec = Worker("ihip-decode-worker", [
        "--model", MODEL, "--prefill", f"127.0.0.1:{pport}", "--kv-dir", st.dir,
        "--threads", THREADS, "--ctx", "1024"])
    try:
        check("prefill (--chunk 32) and decode workers SERVING",
              pre.wait_serving() and dec.wait_serving())
        ch = grpc.insecure_channel(dec.addr)
        api = Api(ch)
        stream = api.generate(prompt="The history of the city goes back many centuries. " * 45,
                              max_tokens=4, sampling=GREEDY, timeout=120)
        done = 0
        for r in stream:
            if r.WhichOneof("event") == "progress" and r.progress.phase == 2 and \
                    r.progress.prompt_tokens_done > 0:
                done = r.progress.prompt_tokens_done
                break
        stream.cancel()
        check("the prefill had started (progress relayed)", done > 0)
        check("the abandoned WRITING sequence is freed",
              wait_for(lambda: st.kv("stats")["seqs"]["writing"] == 0, 10), str(st.kv("stats")))
        t0 = time.monotonic()
        fin = collect(api.generate(prompt="Hello", max_tokens=2, sampling=GREEDY,
                                   timeout=60))[2]
        took = time.monotonic() - t0
        check("the prefill worker is free again at once (next request < 4 s)",
              fin is not None and took < 4.0, f"{took:.2f} s")
        # kill -9 of the prefill worker in the middle of a prefill: UNAVAILABLE, and gc frees
        # the dead writer's WRITING sequence.
        got = []

        def reader():
            try:
                for r in api.generate(prompt="Many centuries ago the city was small. " * 45,
                                      max_tokens=4, sampling=GREEDY, timeout=120):
                    if r.WhichOneof("event") == "progress" and r.progress.phase == 2 and \
                            r.progress.prompt_tokens_done > 0 and not got:
                        got.append("prefilling")
                        pre.proc.kill()
                got.append("OK")
            except grpc.RpcError as e:
                got.append(e.code())
        t = threading.Thread(target=reader)
        t.start()
        t.join(timeout=60)
        check("prefill worker killed (-9) mid-prefill: the client gets UNAVAILABLE",
              got[:1] == ["prefilling"] and got[-1] == SC.UNAVAILABLE, str(got))
        pre.proc.wait()
        g = st.kv("gc")
        s = st.kv("stats")
        check("ihip-kv gc frees the dead prefill worker's WRITING sequence",
              g.get("gc", {}).get("owners_reaped", 0) >= 1 and s["seqs"]["writing"] == 0,
              f"{g.get('gc')} {s['seqs']}")
        check("the decode worker is still SERVING", dec.wait_serving(5))
        ch.close()
    finally:
        check("decode worker exits 0", dec.stop() == 0)
        pre.stop()


def test_sigterm(st):
    dec = st.start_decode()
    check("second decode worker SERVING", dec.wait_serving())
    ch = grpc.insecure_channel(dec.addr)
    api = Api(ch)
    stream = api.generate(prompt=PROMPTS[1], max_tokens=400, sampling=GREEDY, timeout=120)
    got = []

    def reader():
        try:
            for r in stream:
                got.append(r.WhichOneof("event"))
                if got.count("piece") == 2:
                    dec.proc.send_signal(signal.SIGTERM)
            got.append("OK")
        except grpc.RpcError as e:
            got.append(e.code())
    t = threading.Thread(target=reader)
    t.start()
    t.join(timeout=60)
    rc = dec.proc.wait(timeout=30)
    check("SIGTERM mid-stream: the stream ends with UNAVAILABLE or CANCELLED",
          got and got[-1] in (SC.UNAVAILABLE, SC.CANCELLED), str(got[-3:]))
    check("the decode worker exits 0", rc == 0, str(rc))
    check("its lease is released", wait_for(lambda: leases(st) == 0, 10), str(st.kv("stats")))
    ch.close()


def test_decode_crash(st):
    dec = st.start_decode()
    check("third decode worker SERVING", dec.wait_serving())
    ch = grpc.insecure_channel(dec.addr)
    api = Api(ch)
    stream = api.generate(prompt=PROMPTS[2], max_tokens=400, sampling=GREEDY, timeout=120)
    n = 0
    for r in stream:
        if r.WhichOneof("event") == "piece":
            n += 1
            if n == 2:
                break
    before = st.kv("stats")
    dec.proc.kill()
    dec.proc.wait()
    stream.cancel()
    ch.close()
    check("while decoding, the sequence's blocks are in use", before["blocks"]["used"] > 0,
          str(before))
    # The prefill worker's hand-over lease (--handoff-ms 300) goes by itself; the dead decode
    # worker's lease is reaped by gc.
    time.sleep(1.0)
    g = st.kv("gc")
    check("ihip-kv gc reaps the dead decode worker", g.get("gc", {}).get("owners_reaped", 0) >= 1,
          str(g))
    s = st.kv("stats")
    check("every block is reclaimed (used 0, leases 0, no sequence)",
          s["blocks"]["used"] == 0 and s["leases"] == 0 and s["seqs"]["ready"] == 0 and
          s["seqs"]["writing"] == 0, str(s))
    r = subprocess.run([os.path.join(BIN, "ihip-kv"), "check", "ihip", "--dir", st.dir],
                       capture_output=True, text=True, timeout=30)
    check("ihip-kv check passes", r.returncode == 0, r.stdout + r.stderr)


def main():
    for b in ("ihip-decode-worker", "ihip-prefill-worker", "ihip-kv", "ihip"):
        if not os.path.exists(os.path.join(BIN, b)):
            print(f"skip: {b} not built in {BIN}")
            print("0 passed, 0 failed")
            return 77
    if not os.path.exists(MODEL):
        print(f"skip: no model at {MODEL}")
        print("0 passed, 0 failed")
        return 77
    st = Stack()
    try:
        st.start_prefill()
        dec = st.start_decode()
        check("prefill worker SERVING", st.prefill.wait_serving())
        check("decode worker SERVING", dec.wait_serving())
        ch = grpc.insecure_channel(dec.addr)
        api = Api(ch)
        for t in (test_basics,):
            t(st, api, ch)
        for t in (test_greedy_equals_cli, test_long_prompt, test_generate_stream, test_seed,
                  test_concurrent,
                  test_stop, test_cancel,
                  test_deadline, test_invalid, test_exhausted, test_prefill_crash):
            try:
                t(st, api)
            except Exception as e:  # a crash in one test is a failure, not the end of the run
                check(f"{t.__name__} ran without an exception", False, repr(e))
        ch.close()
        rc = dec.stop()
        check("decode worker exits 0 on SIGTERM", rc == 0, str(rc))
        st.decode = None
        for t in (test_round_robin, test_slow_prefill, test_sigterm, test_decode_crash):
            try:
                t(st)
            except Exception as e:
                check(f"{t.__name__} ran without an exception", False, repr(e))
        st.decode = None
    finally:
        n_pass, n_fail = stack.counts()
        if n_fail and st.decode:
            sys.stdout.write("".join(st.decode.log[-30:]))
        st.close()
    n_pass, n_fail = stack.counts()
    print(f"{n_pass} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
