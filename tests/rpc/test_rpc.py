#!/usr/bin/env python3
"""test_rpc.py — common/rpc end to end: the demo worker (build/bin/rpc-test-server) over real
loopback sockets, driven by an independent client (grpcio from PyPI).

Checks: health Check/Watch transitions (NOT_SERVING until ready, SIGUSR1/2 flips, shutdown);
server reflection v1 and v1alpha (services, files with dependencies, de-duplication per stream,
NOT_FOUND, extension numbers) and a dynamic stub built only from reflection (what grpcurl and ghz
do) calling Tokenize; every message field, enum value, service and method of our protos carries a
comment (read from the reflected source info); unary and server-streaming calls, stop strings,
usage and timings; a client-streamed upload larger than 4 MiB; a slow stream and a stream whose
reader stalls do not delay unary calls (back-pressure stays on that stream); cancellation and
deadlines are noticed by the server (Admin.GetStats counters); INVALID_ARGUMENT for bad fields,
garbage bytes and invalid UTF-8; RESOURCE_EXHAUSTED with the retry-delay-ms trailer; UNIMPLEMENTED
for unknown methods; clean exit on SIGTERM.

Also runs rpc-test-client, the C client check of common/rpc (exact status semantics: rc, code,
retry delay) against the same server.

Environment: IHIP_BIN (directory of rpc-test-server and rpc-test-client), or IHIP_RPC_BIN to
override it (e.g. an ASan build). Exit 0 pass, 1 fail, 77 skip (grpcio missing from the venv).
"""
import os
import signal
import struct
import subprocess
import sys
import threading
import time

try:
    import grpc
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase
except ImportError as e:
    print(f"skip: grpcio / grpcio-reflection / grpcio-health-checking missing ({e})")
    print("0 passed, 0 failed")
    sys.exit(77)

N_PASS = 0
N_FAIL = 0


def check(name, cond, detail=""):
    global N_PASS, N_FAIL
    if cond:
        N_PASS += 1
        print(f"ok   {name}")
    else:
        N_FAIL += 1
        print(f"FAIL {name} {detail}")
    return cond


def binary(name):
    """build/bin/<name>, or $IHIP_BIN/<name>; IHIP_RPC_BIN overrides the directory (e.g. an ASan
    build)."""
    bindir = os.environ.get("IHIP_RPC_BIN") or os.environ.get("IHIP_BIN") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "bin")
    return os.path.join(bindir, name)


def server_binary():
    return binary("rpc-test-server")


class Server:
    """One rpc-test-server process on an ephemeral port."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([server_binary(), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            err = self.proc.stderr.read()
            raise RuntimeError(f"server did not start: {line!r} {err}")
        self.port = int(line.split()[1])
        self.addr = f"127.0.0.1:{self.port}"
        self.stderr_lines = []
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self._t.join(timeout=5)
        return rc


# ---- dynamic messages from reflection (no .proto, no generated stubs for our API) ----------------

class Api:
    def __init__(self, channel):
        self.channel = channel
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)
        self.gen = self.pool.FindServiceByName("infinitehip.v1.Generator")
        self.admin = self.pool.FindServiceByName("infinitehip.v1.Admin")

    def cls(self, name):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(name))

    def _method(self, svc, name):
        m = svc.FindMethodByName(name)
        req, resp = (message_factory.GetMessageClass(m.input_type),
                     message_factory.GetMessageClass(m.output_type))
        path = f"/{svc.full_name}/{name}"
        if m.client_streaming:
            return self.channel.stream_stream(path, request_serializer=req.SerializeToString,
                                              response_deserializer=resp.FromString), req
        if m.server_streaming:
            return self.channel.unary_stream(path, request_serializer=req.SerializeToString,
                                             response_deserializer=resp.FromString), req
        return self.channel.unary_unary(path, request_serializer=req.SerializeToString,
                                        response_deserializer=resp.FromString), req

    def method(self, name):
        return self._method(self.gen, name)

    def stats(self):
        call, req = self._method(self.admin, "GetStats")
        r = call(req(), timeout=5)
        return {m.name: m.value for m in r.metrics}


def fnv_id(word):
    h = 2166136261
    for b in word.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h % 49152


def wait_for(pred, timeout=5.0, step=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


# ---- tests ---------------------------------------------------------------------------------------

def test_health(srv, ch):
    stub = health_pb2_grpc.HealthStub(ch)
    HCR = health_pb2.HealthCheckRequest
    S = health_pb2.HealthCheckResponse
    r = stub.Check(HCR(service=""), timeout=5)
    check("health: Check('') is NOT_SERVING before the model is ready", r.status == S.NOT_SERVING,
          str(r.status))
    watch = stub.Watch(HCR(service="infinitehip.v1.Generator"), timeout=30)
    first = next(watch)
    check("health: Watch sends the current status first (NOT_SERVING)",
          first.status == S.NOT_SERVING, str(first.status))
    t0 = time.monotonic()
    second = next(watch)
    check("health: Watch reports SERVING when the server becomes ready",
          second.status == S.SERVING and time.monotonic() - t0 < 5, str(second.status))
    r = stub.Check(HCR(service=""), timeout=5)
    check("health: Check('') is SERVING once ready", r.status == S.SERVING)
    srv.signal(signal.SIGUSR1)
    third = next(watch)
    check("health: Watch reports NOT_SERVING after it is set", third.status == S.NOT_SERVING)
    r = stub.Check(HCR(service="infinitehip.v1.Generator"), timeout=5)
    check("health: Check(Generator) agrees (NOT_SERVING)", r.status == S.NOT_SERVING)
    srv.signal(signal.SIGUSR2)
    fourth = next(watch)
    check("health: and SERVING again", fourth.status == S.SERVING)
    watch.cancel()
    try:
        stub.Check(HCR(service="no.such.Service"), timeout=5)
        check("health: Check(unknown) is NOT_FOUND", False, "no error")
    except grpc.RpcError as e:
        check("health: Check(unknown) is NOT_FOUND", e.code() == grpc.StatusCode.NOT_FOUND,
              str(e.code()))
    w2 = stub.Watch(HCR(service="no.such.Service"), timeout=5)
    m = next(w2)
    check("health: Watch(unknown) says SERVICE_UNKNOWN", m.status == S.SERVICE_UNKNOWN)
    w2.cancel()


EXPECTED_SERVICES = {"infinitehip.v1.Generator", "infinitehip.v1.Admin", "grpc.health.v1.Health",
                     "grpc.reflection.v1.ServerReflection",
                     "grpc.reflection.v1alpha.ServerReflection"}


def reflection_stream(ch, version):
    """A raw reflection stream on /grpc.reflection.<version>.ServerReflection (the messages of v1
    and v1alpha are wire-identical, so the v1alpha classes serve both)."""
    return ch.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)


def test_reflection(ch):
    Req = reflection_pb2.ServerReflectionRequest
    for version in ("v1alpha", "v1"):
        rs = reflection_stream(ch, version)
        reqs = [Req(host="h", list_services=""),
                Req(file_containing_symbol="infinitehip.v1.Generator"),
                Req(file_by_filename="infinitehip/v1/prefiller.proto"),
                Req(file_containing_symbol="infinitehip.v1.Generator.Tokenize"),
                Req(file_containing_symbol="infinitehip.v1.Progress.Phase"),
                Req(file_containing_symbol="no.such.Symbol"),
                Req(file_by_filename="nope.proto"),
                Req(all_extension_numbers_of_type="infinitehip.v1.GenerateRequest"),
                Req(file_by_filename="grpc/health/v1/health.proto")]
        resps = list(rs(iter(reqs), timeout=10))
        check(f"reflection {version}: one response per request", len(resps) == len(reqs),
              str(len(resps)))
        if len(resps) != len(reqs):
            continue
        names = {s.name for s in resps[0].list_services_response.service}
        check(f"reflection {version}: list_services", names == EXPECTED_SERVICES, str(names))
        check(f"reflection {version}: echoes host and request",
              resps[0].valid_host == "h" and resps[0].original_request == reqs[0])

        def files(r):
            out = []
            for b in r.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto()
                fd.ParseFromString(b)
                out.append(fd)
            return out
        f1 = files(resps[1])
        check(f"reflection {version}: symbol → generator.proto + its import common.proto",
              [f.name for f in f1] == ["infinitehip/v1/generator.proto",
                                       "infinitehip/v1/common.proto"], str([f.name for f in f1]))
        gen = f1[0] if f1 else None
        check(f"reflection {version}: generator.proto describes the Generator methods",
              gen is not None and [m.name for m in gen.service[0].method] ==
              ["Generate", "GenerateStream", "Tokenize", "ModelInfo"])
        f2 = files(resps[2])
        check(f"reflection {version}: a dependency already sent on the stream is not resent",
              [f.name for f in f2] == ["infinitehip/v1/prefiller.proto"], str([f.name for f in f2]))
        f3 = files(resps[3])
        check(f"reflection {version}: method symbol → the requested file is always included",
              [f.name for f in f3] == ["infinitehip/v1/generator.proto"], str([f.name for f in f3]))
        f4 = files(resps[4])
        check(f"reflection {version}: nested enum symbol resolves",
              [f.name for f in f4] == ["infinitehip/v1/generator.proto"])
        check(f"reflection {version}: unknown symbol → error_response NOT_FOUND",
              resps[5].HasField("error_response") and resps[5].error_response.error_code == 5)
        check(f"reflection {version}: unknown file → error_response NOT_FOUND",
              resps[6].HasField("error_response") and resps[6].error_response.error_code == 5)
        ext = resps[7].all_extension_numbers_response
        check(f"reflection {version}: extension numbers of a message (none)",
              resps[7].HasField("all_extension_numbers_response") and
              ext.base_type_name == "infinitehip.v1.GenerateRequest" and
              list(ext.extension_number) == [])
        f8 = files(resps[8])
        check(f"reflection {version}: grpc health proto is served",
              [f.name for f in f8] == ["grpc/health/v1/health.proto"])


def commented_paths(fd):
    return {tuple(loc.path) for loc in fd.source_code_info.location
            if loc.leading_comments.strip() or loc.trailing_comments.strip()}


def test_documented(ch):
    """Every message, field, enum, enum value, service and method of infinitehip/v1/*.proto has
    a comment (issue 5: 'every field documented'), read from the source info that reflection
    serves."""
    rs = reflection_stream(ch, "v1")
    Req = reflection_pb2.ServerReflectionRequest
    names = ["common", "generator", "prefiller", "admin"]
    resps = list(rs(iter([Req(file_by_filename=f"infinitehip/v1/{n}.proto") for n in names]),
                    timeout=10))
    missing = []
    n_items = 0
    for r in resps:
        for b in r.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto()
            fd.ParseFromString(b)
            if not fd.name.startswith("infinitehip/"):
                continue
            have = commented_paths(fd)

            def need(path, what):
                nonlocal n_items
                n_items += 1
                if tuple(path) not in have:
                    missing.append(f"{fd.name}:{what}")

            def walk_enum(path, e, scope):
                need(path, f"{scope}{e.name}")
                for vi, v in enumerate(e.value):
                    need(path + [2, vi], f"{scope}{e.name}.{v.name}")

            def walk_msg(path, m, scope):
                need(path, f"{scope}{m.name}")
                for fi, f in enumerate(m.field):
                    need(path + [2, fi], f"{scope}{m.name}.{f.name}")
                for ni, n in enumerate(m.nested_type):
                    walk_msg(path + [3, ni], n, f"{scope}{m.name}.")
                for ei, e in enumerate(m.enum_type):
                    walk_enum(path + [4, ei], e, f"{scope}{m.name}.")
            for mi, m in enumerate(fd.message_type):
                walk_msg([4, mi], m, "")
            for ei, e in enumerate(fd.enum_type):
                walk_enum([5, ei], e, "")
            for si, s in enumerate(fd.service):
                need([6, si], s.name)
                for mi, m in enumerate(s.method):
                    need([6, si, 2, mi], f"{s.name}.{m.name}")
    check(f"protos: all {n_items} messages / fields / enums / values / services / methods documented",
          n_items > 100 and not missing, f"{n_items} items; missing: {missing[:20]}")


def test_dynamic_stub(api):
    check("dynamic stub: Generator has the four methods",
          sorted(m.name for m in api.gen.methods) ==
          sorted(["Generate", "GenerateStream", "Tokenize", "ModelInfo"]))
    tok, Req = api.method("Tokenize")
    r = tok(Req(text="hello  big\tworld", with_pieces=True), timeout=5)
    check("dynamic stub: Tokenize ids", list(r.ids) == [fnv_id(w) for w in ["hello", "big", "world"]],
          str(list(r.ids)))
    check("dynamic stub: Tokenize pieces", list(r.pieces) == [b"hello", b"big", b"world"])
    CM = api.cls("infinitehip.v1.ChatMessage")
    r = tok(Req(chat={"messages": [CM(role="user", content="hi there")]}), timeout=5)
    check("Tokenize chat: rendered and tokenized",
          r.rendered == "user: hi there\n" and len(r.ids) == 3, repr(r.rendered))
    r = tok(Req(text=""), timeout=5)
    check("Tokenize empty text → no tokens", len(r.ids) == 0)
    mi, MReq = api.method("ModelInfo")
    info = mi(MReq(), timeout=5)
    check("ModelInfo unary", info.n_vocab == 49152 and info.backend == "cpu" and
          list(info.attention_presets) == ["dense", "fast"])


def collect_stream(it):
    pieces, progress, finished = [], [], None
    for m in it:
        kind = m.WhichOneof("event")
        if kind == "piece":
            pieces.append(m.piece)
        elif kind == "progress":
            progress.append(m.progress)
        elif kind == "finished":
            finished = m.finished
    return pieces, progress, finished


def test_generate(api):
    gen, Req = api.method("Generate")
    t0 = time.monotonic()
    pieces, progress, fin = collect_stream(gen(Req(text="a b c d", max_tokens=6,
                                                   request_id="r1"), timeout=10))
    check("Generate: a Progress message comes first", len(progress) == 1 and
          progress[0].prompt_tokens_total == 4 and progress[0].phase == 2)
    check("Generate: pieces stream the words", "".join(p.text for p in pieces) ==
          "a b c d a b ", repr("".join(p.text for p in pieces)))
    check("Generate: piece index and token ids", [p.index for p in pieces] == list(range(6)) and
          all(list(p.token_ids) == [fnv_id(p.text.strip())] for p in pieces))
    FR = api.pool.FindEnumTypeByName("infinitehip.v1.FinishReason").values_by_name
    check("Generate: Finished with LENGTH, usage and timings", fin is not None and
          fin.reason == FR["FINISH_REASON_LENGTH"].number and fin.usage.prompt_tokens == 4 and
          fin.usage.generated_tokens == 6 and fin.timings.ttft_us > 0 and
          fin.timings.total_us >= fin.timings.ttft_us and fin.request_id == "r1", str(fin))
    check("Generate: steps are paced (6 x 20 ms)", time.monotonic() - t0 >= 0.1)
    pieces, _, fin = collect_stream(gen(Req(text="one two three four", max_tokens=10,
                                            stop=["three"]), timeout=10))
    check("Generate: stop string ends the text before it", "".join(p.text for p in pieces) ==
          "one two " and fin.reason == FR["FINISH_REASON_STOP_STRING"].number and
          fin.stop_string == "three", str(fin))
    TI = api.cls("infinitehip.v1.TokenIds")
    pieces, progress, fin = collect_stream(gen(Req(tokens=TI(ids=[5, 7]), max_tokens=3),
                                               timeout=10))
    check("Generate: token-id prompt", "".join(p.text for p in pieces) == "t5 t7 t5 ")


def test_upload(api):
    gs, Req = api.method("GenerateStream")
    GR = api.cls("infinitehip.v1.GenerateRequest")
    PC = api.cls("infinitehip.v1.PromptChunk")
    chunk = "abcdefgh " * (1 << 17)  # 1.125 MiB per message
    n_chunks = 4                    # 4.5 MiB in all: more than one 4 MiB message could carry

    def reqs():
        yield Req(header=GR(text="first ", max_tokens=3))
        for _ in range(n_chunks):
            yield Req(chunk=PC(text=chunk))
    pieces, progress, fin = collect_stream(gs(reqs(), timeout=60))
    words = 1 + n_chunks * (1 << 17)
    check("GenerateStream: a 4.5 MiB prompt uploaded in chunks",
          fin is not None and fin.usage.prompt_tokens == words and
          progress and progress[0].prompt_tokens_total == words,
          str(fin.usage if fin else None))
    check("GenerateStream: generation starts at the half-close",
          "".join(p.text for p in pieces) == "first abcdefgh abcdefgh ")
    try:
        list(gs(iter([Req(chunk=PC(text="x"))]), timeout=5))
        check("GenerateStream without header → INVALID_ARGUMENT", False)
    except grpc.RpcError as e:
        check("GenerateStream without header → INVALID_ARGUMENT",
              e.code() == grpc.StatusCode.INVALID_ARGUMENT)


def test_concurrency(api):
    gen, Req = api.method("Generate")
    tok, TReq = api.method("Tokenize")
    # A slow stream (2 s) runs while unary calls go through.
    stream = gen(Req(text="slow stream", max_tokens=100), timeout=30)
    got = []
    th = threading.Thread(target=lambda: got.extend(collect_stream(stream)[0]))
    th.start()
    time.sleep(0.2)
    lat = []
    for _ in range(30):
        t = time.monotonic()
        tok(TReq(text="x y"), timeout=5)
        lat.append(time.monotonic() - t)
    running = th.is_alive()
    th.join()
    lat.sort()
    check("concurrency: unary calls are not blocked by a slow stream",
          running and lat[len(lat) // 2] < 0.1 and lat[-1] < 1.0,
          f"median {lat[len(lat)//2]*1e3:.1f} ms max {lat[-1]*1e3:.1f} ms running={running}")
    check("concurrency: the slow stream completes", len(got) == 100, str(len(got)))


def test_backpressure(addr):
    """A client that stops reading a fast stream: the server stalls that stream only."""
    srv = Server("--step-ms", "0.05", "--ready-ms", "0")
    try:
        # No BDP probing: the client's receive window stays at its default instead of growing to
        # swallow the whole stream.
        ch = grpc.insecure_channel(srv.addr, options=[("grpc.http2.bdp_probe", 0)])
        api = Api(ch)
        gen, Req = api.method("Generate")
        tok, TReq = api.method("Tokenize")
        word = "w" * 4000  # 4000 pieces of 4 KB = 16 MB: far more than any window
        stream = gen(Req(text=f"{word} {word}x", max_tokens=4000), timeout=60)
        first = next(stream)  # admitted; now we stop reading
        ok = wait_for(lambda: api.stats().get("demo.send_stalls", 0) > 0, timeout=10)
        check("back-pressure: the unread stream's queue fills (engine stalls it)", ok,
              str(api.stats()))
        lat = []
        for _ in range(20):
            t = time.monotonic()
            tok(TReq(text="a"), timeout=5)
            lat.append(time.monotonic() - t)
        lat.sort()
        check("back-pressure: unary calls stay fast meanwhile", lat[-1] < 0.5,
              f"max {lat[-1]*1e3:.1f} ms")
        pieces, _, fin = collect_stream(stream)
        check("back-pressure: after reading resumes every piece arrives in order",
              first.WhichOneof("event") == "progress" and len(pieces) == 4000 and
              [p.index for p in pieces] == list(range(4000)) and fin is not None,
              f"{len(pieces)} pieces")
        ch.close()
    finally:
        rc = srv.stop()
        check("back-pressure server exits cleanly", rc == 0, str(rc))


def test_cancel_deadline(api):
    gen, Req = api.method("Generate")
    s0 = api.stats()
    stream = gen(Req(text="never ending story", max_tokens=1000), timeout=30)
    n = 0
    for m in stream:
        if m.WhichOneof("event") == "piece":
            n += 1
            if n == 3:
                break
    t = time.monotonic()
    stream.cancel()
    ok = wait_for(lambda: api.stats()["demo.generate_cancelled"] ==
                  s0["demo.generate_cancelled"] + 1, timeout=5, step=0.005)
    dt = time.monotonic() - t
    s1 = api.stats()
    check("cancel: the server's engine drops the cancelled stream", ok, str(s1))
    check("cancel: noticed within a few steps (< 0.5 s)", dt < 0.5, f"{dt*1e3:.0f} ms")
    check("cancel: counted by the rpc layer", s1["rpc.calls_cancelled"] >= s0["rpc.calls_cancelled"] + 1)
    check("cancel: engine holds no sequence afterwards", s1["demo.generate_active"] == 0)

    t = time.monotonic()
    try:
        collect_stream(gen(Req(text="too slow", max_tokens=1000), timeout=0.3))
        check("deadline: DEADLINE_EXCEEDED", False, "no error")
    except grpc.RpcError as e:
        dt = time.monotonic() - t
        check("deadline: DEADLINE_EXCEEDED after ~0.3 s",
              e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 0.25 < dt < 2,
              f"{e.code()} after {dt:.2f} s")
    ok = wait_for(lambda: api.stats()["demo.generate_cancelled"] ==
                  s0["demo.generate_cancelled"] + 2, timeout=5)
    check("deadline: the server noticed the expiry and dropped the sequence", ok)


def test_deadline_visible(api):
    gen, Req = api.method("Generate")
    collect_stream(gen(Req(text="a", max_tokens=1), timeout=7))
    d = api.stats()["demo.last_deadline_ms"]
    check("deadline: the handler sees the client's deadline (rpc_call_deadline_ms)",
          6000 < d <= 7100, str(d))  # grpc-timeout is sent rounded up
    collect_stream(gen(Req(text="a", max_tokens=1)))
    d = api.stats()["demo.last_deadline_ms"]
    check("deadline: none set → none seen", d == -1, str(d))


def test_bind_and_log(srv):
    """A second server on a busy port fails (SO_REUSEPORT off), and gRPC's own log goes through
    cm_log ("[level] grpc file:line: ...")."""
    env = dict(os.environ, GRPC_VERBOSITY="INFO")
    p = subprocess.run([server_binary(), "--addr", srv.addr], capture_output=True, text=True,
                       timeout=30, env=env)
    check("bind: a second server on the same port fails", p.returncode == 1 and
          "cannot listen" in p.stderr, f"rc={p.returncode} {p.stderr[-300:]}")
    import re
    routed = [l for l in p.stderr.splitlines() if re.match(r"^\[(error|warn|info|debug)\] grpc \S+:\d+: ", l)]
    raw = [l for l in p.stderr.splitlines() if re.match(r"^[EIDW]\d{4} ", l)]
    check("log: gRPC's messages are routed into cm_log", routed and not raw,
          f"routed={routed[:2]} raw={raw[:2]}")


def expect_code(name, fn, code, detail_sub=None):
    try:
        fn()
        check(name, False, "no error")
        return None
    except grpc.RpcError as e:
        ok = e.code() == code and (detail_sub is None or detail_sub in (e.details() or ""))
        check(name, ok, f"{e.code()} {e.details()!r}")
        return e


def test_errors(api, ch):
    gen, Req = api.method("Generate")
    SP = api.cls("infinitehip.v1.SamplingParams")
    IA = grpc.StatusCode.INVALID_ARGUMENT

    def run(req):
        return lambda: collect_stream(gen(req, timeout=5))
    expect_code("INVALID_ARGUMENT: no prompt", run(Req(max_tokens=3)), IA, "prompt")
    expect_code("INVALID_ARGUMENT: empty prompt", run(Req(text="   ")), IA, "empty")
    expect_code("INVALID_ARGUMENT: temperature < 0",
                run(Req(text="a", sampling=SP(temperature=-1))), IA, "temperature")
    expect_code("INVALID_ARGUMENT: temperature NaN",
                run(Req(text="a", sampling=SP(temperature=float("nan")))), IA, "temperature")
    expect_code("INVALID_ARGUMENT: top_p = 0", run(Req(text="a", sampling=SP(top_p=0))), IA,
                "top_p")
    expect_code("INVALID_ARGUMENT: max_tokens too large", run(Req(text="a", max_tokens=100000)),
                IA, "max_tokens")
    expect_code("INVALID_ARGUMENT: empty stop string", run(Req(text="a", stop=[""])), IA, "stop")
    TI = api.cls("infinitehip.v1.TokenIds")
    expect_code("INVALID_ARGUMENT: token id out of range",
                run(Req(tokens=TI(ids=[1, 99999999]))), IA, "tokens")
    # Explicit zero is not "unset": temperature 0 (greedy) is accepted.
    pieces, _, fin = collect_stream(gen(Req(text="z", max_tokens=1, sampling=SP(temperature=0)),
                                        timeout=5))
    check("temperature = 0 (explicitly set) is accepted", fin is not None and len(pieces) == 1)

    raw = ch.unary_stream("/infinitehip.v1.Generator/Generate",
                          request_serializer=lambda b: b, response_deserializer=lambda b: b)
    expect_code("INVALID_ARGUMENT: garbage bytes",
                lambda: list(raw(b"\xff\xff\xff\xff\x0f", timeout=5)), IA, "malformed")
    # field 1 (text), wire type 2, 2 bytes that are not UTF-8
    expect_code("INVALID_ARGUMENT: invalid UTF-8 in a string field",
                lambda: list(raw(b"\x0a\x02\xc3\x28", timeout=5)), IA, "UTF-8")
    raw_unary = ch.unary_unary("/infinitehip.v1.Generator/Tokenize",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    expect_code("INVALID_ARGUMENT: Tokenize with no input", lambda: raw_unary(b"", timeout=5), IA)
    UI = grpc.StatusCode.UNIMPLEMENTED
    t = time.monotonic()
    expect_code("UNIMPLEMENTED: unknown method (no hang)",
                lambda: ch.unary_unary("/infinitehip.v1.Generator/Nope")(b"", timeout=5), UI)
    check("UNIMPLEMENTED comes at once", time.monotonic() - t < 1.0)
    expect_code("UNIMPLEMENTED: a service this worker does not serve (Prefiller)",
                lambda: list(ch.unary_stream("/infinitehip.v1.Prefiller/Prefill")(b"", timeout=5)),
                UI)


def retry_delay(e):
    for k, v in (e.trailing_metadata() or ()):
        if k == "retry-delay-ms":
            return v
    return None


def test_resource_exhausted(api):
    gen, Req = api.method("Generate")
    streams = []
    for i in range(4):  # the server's --max-streams
        s = gen(Req(text=f"busy{i}", max_tokens=1000), timeout=30)
        next(s)  # the Progress message: admitted
        streams.append(s)
    e = expect_code("RESOURCE_EXHAUSTED: too many concurrent sequences",
                    lambda: collect_stream(gen(Req(text="one more"), timeout=5)),
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "sequences")
    check("RESOURCE_EXHAUSTED carries retry-delay-ms (handler value 250)",
          e is not None and retry_delay(e) == "250", str(e and e.trailing_metadata()))
    for s in streams:
        s.cancel()
    ok = wait_for(lambda: api.stats()["demo.generate_active"] == 0, timeout=5)
    check("RESOURCE_EXHAUSTED: capacity frees once the streams are cancelled", ok)
    pieces, _, fin = collect_stream(gen(Req(text="now fits", max_tokens=2), timeout=5))
    check("after retry the request is admitted", fin is not None and len(pieces) == 2)

    gs, SReq = api.method("GenerateStream")
    GR = api.cls("infinitehip.v1.GenerateRequest")
    PC = api.cls("infinitehip.v1.PromptChunk")

    def big():
        yield SReq(header=GR(max_tokens=1))
        for _ in range(3):
            yield SReq(chunk=PC(text="w " * 400000))  # 1.2M words > --max-prompt-words 1M
    e = expect_code("RESOURCE_EXHAUSTED: prompt over the token limit",
                    lambda: collect_stream(gs(big(), timeout=30)),
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "limit")
    check("RESOURCE_EXHAUSTED carries retry-delay-ms (server default 1000)",
          e is not None and retry_delay(e) == "1000", str(e and e.trailing_metadata()))


def test_c_client(srv, api):
    p = subprocess.run([binary("rpc-test-client"), srv.addr], capture_output=True, text=True,
                       timeout=120)
    lines = p.stdout.strip().splitlines()
    for line in lines[:-1]:
        check(f"C client: {line[5:]}", line.startswith("ok"), line)
    check("C client: exit 0 and a summary", p.returncode == 0 and lines and
          lines[-1].endswith(" 0 failed"), p.stdout[-500:] + p.stderr[-2000:])
    ok = wait_for(lambda: api.stats()["demo.generate_active"] == 0, timeout=5)
    check("C client: its cancelled / freed streams leave nothing in the engine", ok)


def test_shutdown(srv, ch):
    stub = health_pb2_grpc.HealthStub(ch)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    first = next(watch)
    t = time.monotonic()
    srv.signal(signal.SIGTERM)
    rest = []
    try:
        for m in watch:
            rest.append(m.status)
    except grpc.RpcError:
        pass
    check("shutdown: Watch sees NOT_SERVING before the server goes",
          first.status == health_pb2.HealthCheckResponse.SERVING and
          health_pb2.HealthCheckResponse.NOT_SERVING in rest, str(rest))
    rc = srv.stop()
    check("shutdown: exit 0 within a few seconds", rc == 0 and time.monotonic() - t < 10,
          f"rc={rc} after {time.monotonic()-t:.1f} s; log tail: {''.join(srv.stderr_lines[-5:])}")


def main():
    for b in (server_binary(), binary("rpc-test-client")):
        if not os.path.exists(b):
            print(f"FAIL not built: {b}")
            print("0 passed, 1 failed")
            return 1
    srv = Server("--ready-ms", "700", "--max-streams", "4")
    ch = grpc.insecure_channel(srv.addr)
    try:
        test_health(srv, ch)
        test_reflection(ch)
        test_documented(ch)
        api = Api(ch)
        test_dynamic_stub(api)
        test_generate(api)
        test_upload(api)
        test_concurrency(api)
        test_cancel_deadline(api)
        test_deadline_visible(api)
        test_bind_and_log(srv)
        test_errors(api, ch)
        test_resource_exhausted(api)
        test_backpressure(srv.addr)
        test_c_client(srv, api)
        st = api.stats()
        check("stats: no call leaked (only the GetStats call itself is active)",
              st["rpc.calls_active"] <= 1, str(st))
        test_shutdown(srv, ch)
    except Exception as e:  # a crash of the test itself is a failure, with the server's log
        import traceback
        traceback.print_exc()
        check("test ran to the end", False, repr(e))
        print("server log tail:", "".join(srv.stderr_lines[-20:]))
    finally:
        ch.close()
        srv.stop()
    asan = [l for l in srv.stderr_lines if "ERROR: AddressSanitizer" in l or
            "ERROR: LeakSanitizer" in l or "runtime error:" in l]
    check("server log has no sanitizer report", not asan, "".join(asan[:5]))
    print(f"{N_PASS} passed, {N_FAIL} failed")
    return 0 if N_FAIL == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
