#!/usr/bin/env python3
"""test_malformed.py — malformed and edge-case requests against REAL workers.

One stack for the whole file: ihip-prefill-worker --kv-create and ihip-decode-worker on loopback
ephemeral ports, sharing a kvstore segment in a temporary --kv-dir, with the real model. Every
request is built by hand with a small protobuf wire encoder (below), so the test can send what a
generated client refuses to: invalid UTF-8 in proto3 strings, unknown fields and wire types,
truncated bytes, oneof members given twice, out-of-range varints. Calls go through raw grpcio
channels whose serializers pass bytes as they are.

The cases are a table (name, call, accepted status codes, extra check); each must end with one of
the accepted gRPC statuses, and a successful Generate must end with exactly one Finished message.
After every case both processes must still be alive. Covered: prompt kinds (unset, empty,
whitespace, NUL, both oneof members), max_tokens edges, sampling values (negative, NaN, inf,
out of range, seeds), stop strings, invalid UTF-8 in every request string field of every
method, unknown fields / wire types / field numbers, non-canonical encodings, token ids, chat
(unknown role, empty content, thousands of turns), attention overrides (unknown preset, bad
config_json: not an object, a file path, a FIFO, deep nesting, huge), request_id, messages over
the server's receive limit, truncated and garbage bytes, unknown methods and services,
GenerateStream misuse, Tokenize / ModelInfo / GetStats / Health oddities, Prefiller.Prefill
called directly, 1 ms deadlines, cancellation (right after sending, after the first message,
mid-decode, mid-upload, by closing the channel), and the raw TCP socket (non-HTTP/2 bytes, a
bogus HTTP/2 preface, bad frames, idle half-open connections).

The whole table runs twice (IHIP_MALFORMED_PASSES, default 2): the second pass must leave the
workers' RSS flat (within RSS_PASS2_MB), which is where a per-request leak would show.

After the cases: both workers answer health SERVING; a greedy Generate equals the one made
before the cases and `ihip generate --temp 0`; `ihip-kv` shows no WRITING sequence and no lease
beyond the decode worker's retained sequences (decode.kv_retained), and `ihip-kv check` passes;
the workers' RSS did not grow by more than RSS_GROWTH_MB in all; both exit 0 on SIGTERM, after
which no lease and no WRITING sequence is left; their stderr holds no sanitizer / assertion
text. Run with an IHIP_SANITIZE=ON build in IHIP_BIN (plus `ihip` from a normal build) to have
ASan/UBSan/LSan check every case.

Known problems the cases pin (see the comments at each): protobuf-c 1.4.1 fails to unpack a
singular message field given twice when that message has oneof members (answered as a
malformed message); gRPC core ignores a DATA frame on stream 0 instead of closing the
connection.

Prints "N cases, N ok". Environment: IHIP_BIN, IHIP_MODEL, IHIP_SRC. Exit 0 pass, 1 fail,
77 skip (no model, binaries or grpcio).
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import stack  # noqa: E402
from stack import BIN, MODEL, SRC, free_port  # noqa: E402,F401
try:
    import grpc
except ImportError as e:
    print(f"skip: grpcio missing ({e})")
    print("0 passed, 0 failed")
    sys.exit(77)

SC = grpc.StatusCode
OK, IA, RE, FP = SC.OK, SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED, SC.FAILED_PRECONDITION
UI, DE, CA, UN = SC.UNIMPLEMENTED, SC.DEADLINE_EXCEEDED, SC.CANCELLED, SC.UNAVAILABLE
THREADS = "1"
N_VOCAB = 49152
RSS_GROWTH_MB = 160  # allowed growth of each worker's RSS over all the cases
RSS_PASS2_MB = 40  # allowed growth from the end of pass 1 to the end of the last pass
PASSES = int(os.environ.get("IHIP_MALFORMED_PASSES", "2"))  # runs of the whole table
MAX_RECV = 4 << 20  # decode worker's gRPC max receive length (ModelInfo.max_message_bytes)
GEN = "/infinitehip.v1.Generator/Generate"
GSTREAM = "/infinitehip.v1.Generator/GenerateStream"
TOKENIZE = "/infinitehip.v1.Generator/Tokenize"
MODELINFO = "/infinitehip.v1.Generator/ModelInfo"
STATS = "/infinitehip.v1.Admin/GetStats"
HEALTH = "/grpc.health.v1.Health/Check"
PREFILL = "/infinitehip.v1.Prefiller/Prefill"


# ---- protobuf wire format, by hand ------------------------------------------------------------

def varint(n):
    n &= (1 << 64) - 1  # negative int32/int64: ten bytes, two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field, wt):
    return varint((field << 3) | wt)


def fv(field, v):
    """varint field (int32, uint32, uint64, bool)."""
    return tag(field, 0) + varint(v)


def f64(field, v):
    """A fixed64 field."""
    return varint(field << 3 | 1) + int(v).to_bytes(8, "little")


def fb(field, b):
    """length-delimited field (string, bytes, message)."""
    if isinstance(b, str):
        b = b.encode("utf-8", "surrogatepass")
    return tag(field, 2) + varint(len(b)) + b


def ff(field, x):
    """fixed32 field: a float, or 4 raw bytes."""
    return tag(field, 5) + (x if isinstance(x, bytes) else struct.pack("<f", x))


def fm(field, *parts):
    return fb(field, b"".join(parts))


def packed(field, ids):
    return fb(field, b"".join(varint(i) for i in ids))


def rvarint(buf, i):
    n = s = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << s
        s += 7
        if not b & 0x80:
            return n, i


def parse(buf):
    """Top-level fields of a message: [(field, wire type, value)]."""
    i, out = 0, []
    while i < len(buf):
        key, i = rvarint(buf, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = rvarint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = rvarint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        out.append((f, wt, v))
    return out


def field(msg, f, default=None):
    for ff_, _, v in parse(msg):
        if ff_ == f:
            return v
    return default


SAMPLING_FIELDS = {"temperature": (1, "f"), "top_k": (2, "v"), "top_p": (3, "f"),
                   "min_p": (4, "f"), "repeat_penalty": (5, "f"), "repeat_last_n": (6, "v"),
                   "seed": (7, "v")}


def sampling(**kw):
    parts = []
    for k, v in kw.items():
        f, kind = SAMPLING_FIELDS[k]
        parts.append(ff(f, v) if kind == "f" else fv(f, v))
    return fm(4, *parts)


def greq(*extra, text="Hi", mt=2, samp=None):
    """A GenerateRequest: text prompt, max_tokens, greedy sampling (plus overrides), extras."""
    out = b""
    if text is not None:
        out += fb(1, text)
    if mt is not None:
        out += fv(5, mt)
    if samp is not False:  # False: no SamplingParams (the extras may carry one)
        s = {"temperature": 0.0}
        s.update(samp or {})
        out += sampling(**s)
    return out + b"".join(extra)


def chat(msgs, gen=None):
    parts = [fm(1, fb(1, r), fb(2, c)) for r, c in msgs]
    if gen is not None:
        parts.append(fv(2, int(gen)))
    return fm(2, *parts)


def attention(preset=None, config=None, extend=None):
    parts = []
    if preset is not None:
        parts.append(fb(1, preset))
    if config is not None:
        parts.append(fb(2, config))
    if extend is not None:
        parts.append(fv(3, int(extend)))
    return fm(7, *parts)


def hdr(*parts):
    return fm(1, *parts)  # GenerateStreamRequest.header


def chunk(*parts):
    return fm(2, *parts)  # GenerateStreamRequest.chunk


def preq(ids=(1, 2, 3), *extra):
    """A PrefillRequest."""
    return fb(1, "malformed-test") + packed(2, ids) + b"".join(extra)


BAD_UTF8 = {
    "lone continuation byte": b"a\x80b",
    "overlong '/'": b"\xc0\xaf",
    "surrogate U+D800": b"\xed\xa0\x80",
    "above U+10FFFF": b"\xf4\x90\x80\x80",
    "truncated 3-byte": b"ok\xe2\x82",
    "byte 0xFF": b"\xff",
}


# ---- processes --------------------------------------------------------------------------------

class Worker(stack.Worker):
    """stack.Worker that waits at most 30 s for a stop."""

    def stop(self, sig=signal.SIGTERM, timeout=30):
        return super().stop(sig, timeout)


IDENT = (lambda b: b)


class Res:
    def __init__(self, code, details="", msgs=(), md=None):
        self.code, self.details, self.msgs, self.md = code, details, list(msgs), md or {}

    def __repr__(self):
        code = self.code.name if self.code else self.code
        return f"{code} {self.details!r} ({len(self.msgs)} msgs)"


def _err(e):
    md = {k: v for k, v in (e.trailing_metadata() or ())}
    return Res(e.code(), e.details() or "", (), md)


def uu(ch, path, payload, timeout=20):
    try:
        return Res(OK, "", [ch.unary_unary(path, IDENT, IDENT)(payload, timeout=timeout)])
    except grpc.RpcError as e:
        return _err(e)


def us(ch, path, payload, timeout=30):
    msgs = []
    try:
        for m in ch.unary_stream(path, IDENT, IDENT)(payload, timeout=timeout):
            msgs.append(m)
        return Res(OK, "", msgs)
    except grpc.RpcError as e:
        r = _err(e)
        r.msgs = msgs
        return r


def ss(ch, path, payloads, timeout=30):
    msgs = []
    try:
        for m in ch.stream_stream(path, IDENT, IDENT)(iter(payloads), timeout=timeout):
            msgs.append(m)
        return Res(OK, "", msgs)
    except grpc.RpcError as e:
        r = _err(e)
        r.msgs = msgs
        return r


def gen_summary(msgs):
    """(text, ids, finished fields, kinds) of Generate responses."""
    text, ids, fin, kinds = [], [], None, []
    for m in msgs:
        f, _, v = parse(m)[0]
        kinds.append(f)
        if f == 1:
            text.append(field(v, 1, b"").decode())
            tid = field(v, 2, b"")
            i = 0
            while i < len(tid):
                x, i = rvarint(tid, i)
                ids.append(x)
        elif f == 3:
            fin = {k: val for k, _, val in parse(v)}
    return "".join(text), ids, fin, kinds


def prompt_tokens(r):
    fin = gen_summary(r.msgs)[2] if r.code == OK else None
    return {k: v for k, _, v in parse(fin.get(3, b""))}.get(1) if fin else None


def finished_ok(r):
    """A successful Generate: progress*, piece+, exactly one Finished at the end, usage sane."""
    if r.code != OK:
        return True, ""
    text, ids, fin, kinds = gen_summary(r.msgs)
    if kinds.count(3) != 1 or kinds[-1] != 3 or 1 not in kinds:
        return False, f"stream shape {kinds}"
    usage = {k: v for k, _, v in parse(fin.get(3, b""))}
    if usage.get(3, 0) != len(ids) or not usage.get(1):
        return False, f"usage {usage} vs {len(ids)} ids"
    if max(kinds.index(3), *(i for i, k in enumerate(kinds) if k == 2), 0) != kinds.index(3):
        return False, f"progress after finished {kinds}"
    return True, ""


def reference(prompt, n):
    r = subprocess.run([os.path.join(BIN, "ihip"), "generate", "-m", MODEL, "-p", prompt, "-n",
                        str(n), "--temp", "0", "--attention", "hip", "-t", THREADS, "--quiet"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return None
    return r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout


# ---- raw TCP ------------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2frame(ftype, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", stream) + payload


def tcp_closed(port, data, wait=3.0):
    """Send data on a fresh TCP connection; True if the server closes it (EOF or reset) within
    `wait` seconds. An HTTP/2 GOAWAY before the close is fine."""
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    try:
        s.sendall(data)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            s.settimeout(max(0.05, end - time.monotonic()))
            try:
                b = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return True
            except socket.timeout:
                return False
            if not b:
                return True
        return False
    finally:
        s.close()


# ---- the stack and the cases ------------------------------------------------------------------

class Ctx:
    pass


def build_cases(c):
    """The case table: [(name, thunk -> Res, accepted codes, extra check or None)]."""
    d, p = c.dch, c.pch
    cases = []

    def add(name, thunk, codes, extra=None):
        cases.append((name, thunk, set(codes) if isinstance(codes, (set, list, tuple))
                      else {codes}, extra))

    def gen(name, payload, codes, timeout=60, extra=None):
        add(f"Generate: {name}", lambda: us(d, GEN, payload, timeout), codes,
            extra or finished_ok)

    # -- the prompt
    gen("empty message (no prompt, nothing)", b"", IA)
    gen("all prompt kinds unset (only max_tokens + sampling)", greq(text=None), IA)
    gen("empty text", greq(text=""), IA)
    gen("text of one space", greq(text=" "), OK)
    gen("text of only whitespace", greq(text=" \t\n  \r\n "), OK)
    gen("text of one newline", greq(text="\n"), OK)
    gen("text 'a'", greq(text="a"), OK)
    # protobuf-c keeps strings NUL-terminated and would cut "a\0b" to "a": the rpc layer scans
    # the wire bytes and refuses any string field holding a NUL (rpc_wire_check_strings).
    gen("text with an embedded NUL 'a\\0b'", greq(text="a\x00b"), IA)
    gen("text of only NUL", greq(text="\x00"), IA)
    gen("text of U+FFFD and emoji", greq(text="\ufffd\U0001F600 ok"), OK)
    gen("chat with no messages", greq(fm(2), text=None), IA)
    gen("tokens with no ids", greq(fm(3), text=None), IA)
    gen("text then empty tokens (oneof: last wins)", greq(fm(3)), IA)
    gen("tokens then text (oneof: last wins)", fm(3, packed(1, [1, 2])) + greq(text="Hi"), OK)
    gen("add_bos true", greq(fv(8, 1)), OK)
    gen("add_bos = 7 (non-canonical bool)", greq(fv(8, 7)), OK)
    gen("prompt over --max-prompt-tokens", greq(text="word " * 400), RE,
        extra=lambda r: (r.md.get("retry-delay-ms") is not None, str(r.md)))
    gen("100 KB text prompt", greq(text="x" * 100_000), RE)

    # -- max_tokens
    gen("max_tokens 0 = default (--default-max-tokens 3)", greq(mt=0), OK,
        extra=lambda r: (finished_ok(r)[0] and len(gen_summary(r.msgs)[1]) <= 3,
                         str(gen_summary(r.msgs)[1])))
    gen("max_tokens 1", greq(mt=1), OK)
    gen("max_tokens = --max-tokens-limit (24)", greq(mt=24), OK)
    gen("max_tokens = limit + 1", greq(mt=25), IA)
    gen("max_tokens 2^32-1", greq(mt=0xFFFFFFFF), IA)
    gen("max_tokens as a 10-byte varint of -1", greq(mt=-1), IA)
    gen("max_tokens 2^32+2 (uint32 truncation)", greq(mt=(1 << 32) + 2), {OK, IA})

    # -- sampling
    nan, inf = float("nan"), float("inf")
    for k, v, codes in [
            ("temperature", -1.0, IA), ("temperature", -0.0, OK), ("temperature", nan, IA),
            ("temperature", inf, IA), ("temperature", -inf, IA), ("temperature", 100.0, OK),
            ("temperature", 100.5, IA), ("temperature", 1e-45, OK),
            ("temperature", b"\xff\xff\x7f\x7f", IA),  # FLT_MAX
            ("temperature", b"\x01\x00\xc0\x7f", IA),  # a signalling NaN pattern
            ("top_k", -1, IA), ("top_k", -(1 << 31), IA), ("top_k", 0, OK),
            ("top_k", (1 << 31) - 1, OK), ("top_k", N_VOCAB + 1, OK),
            ("top_p", 0.0, IA), ("top_p", -0.5, IA), ("top_p", 1.0, OK), ("top_p", 1.0001, IA),
            ("top_p", nan, IA), ("top_p", inf, IA), ("top_p", 1e-30, OK),
            ("min_p", -0.1, IA), ("min_p", 0.0, OK), ("min_p", 0.999, OK), ("min_p", 1.0, IA),
            ("min_p", nan, IA), ("min_p", -inf, IA),
            ("repeat_penalty", 0.5, IA), ("repeat_penalty", 1.0, OK),
            ("repeat_penalty", 10.0, OK), ("repeat_penalty", 10.5, IA),
            ("repeat_penalty", nan, IA), ("repeat_penalty", inf, IA),
            ("repeat_last_n", -1, IA), ("repeat_last_n", 0, OK),
            ("repeat_last_n", (1 << 31) - 1, OK),
            ("seed", 0, OK), ("seed", (1 << 64) - 1, OK), ("seed", 1 << 63, OK)]:
        shown = v.hex() if isinstance(v, bytes) else v
        gen(f"sampling.{k} = {shown}", greq(samp={k: v}), codes)
    gen("temperature 1.5 with seed, top_k 0, top_p 1, min_p 0",
        greq(samp=dict(temperature=1.5, seed=7, top_k=0, top_p=1.0, min_p=0.0)), OK)
    gen("temperature sent as a varint (wrong wire type)", greq(fm(4, fv(1, 3)), samp=False), IA)
    gen("top_k sent as fixed32 (wrong wire type)", greq(fm(4, ff(2, 1.0)), samp=False), IA)
    # A singular message given twice must be merged (protobuf encoding spec); protobuf-c 1.4.1
    # fails to unpack it when the message has oneof members (all of SamplingParams'), so the
    # worker answers "malformed" INVALID_ARGUMENT. Sensible, if not conformant.
    gen("sampling given twice (wire-level merge)", greq(fm(4, ff(3, 0.5))), {OK, IA})
    gen("attention given twice (wire-level merge)",
        greq(attention(preset="fast"), attention(config="{}")), {OK, IA})

    # -- stop strings
    gen("16 stop strings", greq(*[fb(6, f"zz{i}") for i in range(16)]), OK)
    gen("17 stop strings", greq(*[fb(6, f"zz{i}") for i in range(17)]), IA)
    gen("10000 stop strings", greq(*[fb(6, "q") for _ in range(10000)]), IA)
    gen("an empty stop string", greq(fb(6, "zz"), fb(6, "")), IA)
    gen("a 256-byte stop string", greq(fb(6, "s" * 256)), OK)
    gen("a 257-byte stop string", greq(fb(6, "s" * 257)), IA)
    gen("a 1 MiB stop string", greq(fb(6, "s" * (1 << 20))), IA)
    gen("a stop string of only NUL", greq(fb(6, "\x00")), IA)
    gen("a stop string that matches at once (' ')", greq(fb(6, " "), fb(6, "e"), mt=8), OK)
    gen("a multi-byte stop string", greq(fb(6, "é€😀")), OK)

    # -- invalid UTF-8 in every string field of GenerateRequest
    for label, bad in BAD_UTF8.items():
        gen(f"text: {label}", greq(text=None) + fb(1, bad), IA,
            extra=lambda r: ("UTF-8" in r.details, r.details))
    gen("chat role: invalid UTF-8", greq(chat([(b"us\xffer", "hi")]), text=None), IA)
    gen("chat content: invalid UTF-8", greq(chat([("user", b"\xc3\x28")]), text=None), IA)
    gen("stop[3]: invalid UTF-8", greq(fb(6, "a"), fb(6, "b"), fb(6, "c"), fb(6, b"\xed\xa0\x80")),
        IA)
    gen("attention.preset: invalid UTF-8", greq(attention(preset=b"fa\xffst")), IA)
    gen("attention.config_json: invalid UTF-8", greq(attention(config=b'{"x": "\xc0\xaf"}')), IA)
    gen("request_id: invalid UTF-8", greq(fb(9, b"id\x80")), IA)

    # -- unknown fields (ignored) and malformed wire data
    gen("unknown varint field 99", greq(fv(99, 12345)), OK)
    gen("unknown length-delimited field 1000 (1 KB)", greq(fb(1000, b"\x00" * 1024)), OK)
    gen("unknown fixed64 field 2^29-1", greq(tag((1 << 29) - 1, 1) + b"\x01" * 8), OK)
    gen("unknown fixed32 field inside sampling", greq(fm(4, ff(77, 1.0), ff(1, 0.0)),
                                                      samp=False), OK)
    gen("unknown field inside a chat message", greq(fm(2, fm(1, fb(1, "user"), fb(2, "Hi"),
                                                              fv(9, 1))), text=None), OK)
    gen("unknown enum-like varint (huge) in field 11", greq(fv(11, (1 << 64) - 1)), OK)
    gen("field number 0", greq(tag(0, 0) + b"\x01"), IA)
    gen("wire type 6", greq(tag(12, 6) + b"\x01"), IA)
    gen("wire type 7", greq(tag(12, 7) + b"\x01"), IA)
    gen("deprecated group (wire types 3/4) in an unknown field", greq(tag(50, 3) + tag(50, 4)),
        {OK, IA})
    gen("truncated: length says 100, 2 bytes follow", b"\x0a\x64hi", IA)
    gen("truncated varint at the end", greq() + b"\x28\xff", IA)
    gen("varint of 11 bytes", greq() + b"\x28" + b"\xff" * 10 + b"\x01", IA)
    gen("garbage bytes", b"\xff\xff\xff\xff\x0f", IA)
    gen("4 KB of 0xFF", b"\xff" * 4096, IA)
    gen("a length of 2^63", b"\x0a" + b"\xff" * 8 + b"\x7f", IA)
    gen("sampling submessage of garbage", greq(fb(4, b"\x0d\x00")), IA)

    gen("200 000 unknown varint fields", greq(b"".join(fv(100 + i % 50, i) for i in
                                                     range(200_000))), OK)
    gen("unknown field 15 given as a 1 MiB string", greq(fb(15, "u" * (1 << 20))), OK)

    # -- token ids
    def toks(ids, raw=None):
        return greq(fm(3, raw if raw is not None else packed(1, ids)), text=None)
    gen("token id -1", toks([1, -1]), IA)
    gen("token id INT32_MIN", toks([-(1 << 31)]), IA)
    gen("token id = n_vocab", toks([N_VOCAB]), IA)
    gen("token id = n_vocab - 1", toks([N_VOCAB - 1]), OK)
    gen("token id 0", toks([0]), OK)
    gen("token id 2^40 (int32 truncation)", toks([1 << 40]), {IA, OK})
    gen("unpacked token ids (one field each)", toks(None, fv(1, 1) + fv(1, 2) + fv(1, 3)), OK)
    gen("packed ids with a truncated varint", toks(None, fb(1, b"\x01\x82")), IA)
    gen("300 token ids (over --max-prompt-tokens)", toks([1] * 300), RE)
    gen("1 M token ids (4 MB message)", toks([5] * 1_000_000), {RE})

    # -- chat
    gen("chat: unknown role", greq(chat([("wizard", "Hello")]), text=None), OK)
    gen("chat: empty role", greq(chat([("", "Hello")]), text=None), {OK, IA})
    gen("chat: empty content", greq(chat([("user", "")]), text=None), OK)
    gen("chat: template syntax in the content",
        greq(chat([("user", "{{ 7*7 }} {% for x in y %}")]), text=None), OK)
    gen("chat: add_generation_prompt false", greq(chat([("user", "Hi")], gen=False), text=None),
        OK)
    gen("chat: 3000 messages (over --max-prompt-tokens)",
        greq(chat([("user", "hi")] * 3000), text=None), RE)
    gen("chat: 5000 messages", greq(chat([("user", "")] * 5000), text=None), IA)
    gen("chat: a message with neither role nor content", greq(fm(2, fm(1)), text=None), {OK, IA})

    # -- attention overrides
    for preset, codes in [("sparse", IA), ("DENSE", IA), ("", OK), ("dense", OK), ("fast", OK),
                          ("flash", OK), ("3k", OK), ("fast\x00dense", IA),
                          ("x" * 10000, IA)]:
        gen(f"attention.preset {preset[:12]!r}", greq(attention(preset=preset)), codes)
    for cfg, codes in [("{}", OK), ("  {}  ", OK), ("[]", IA), ("1", IA), ("null", IA),
                       ('"text"', IA), ("/etc/passwd", IA), ("  /etc/passwd", IA),
                       ("/dev/zero", IA), ("{", IA), ('{"nope": 1}', IA),
                       ('{"mask_refresh_interval": -5}', IA), ('{"layers": "x"}', IA),
                       ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", IA),
                       ('{"a": ' + "{" * 200000, IA),
                       ('{"x": "' + "a" * (2 << 20) + '"}', IA),
                       ('{"layers": [' + ",".join(["1"] * 100000) + "]}", IA),
                       ('{"a":1,"a":2}', IA), ("{\"\\ud800\": 1}", IA)]:
        gen(f"attention.config_json {cfg[:24]!r}{'...' if len(cfg) > 24 else ''}",
            greq(attention(config=cfg)), codes)
    gen("config_json with preset dense", greq(attention(preset="dense", config="{}")), IA)
    gen("using_extend with preset dense", greq(attention(preset="dense", extend=True)), IA)
    gen("using_extend true with preset fast", greq(attention(preset="fast", extend=True)), OK)

    # -- request_id
    for rid, codes in [("a\tb", IA), ("\x01", IA), ("\x7f", IA), ("\n", IA), ("é", IA),
                       ("\x1b[31mred", IA), ("r" * 128, OK), ("r" * 129, IA),
                       ("ok-id.1:2/3", OK), ("a\x00b", IA)]:
        gen(f"request_id {rid[:16]!r}", greq(fb(9, rid)), codes)

    # -- progress_interval_ms
    gen("progress_interval_ms 1 (raised to 50)", greq(fv(10, 1)), OK)
    gen("progress_interval_ms 2^32-1", greq(fv(10, 0xFFFFFFFF)), OK)

    # -- messages over the receive limit: gRPC itself refuses them
    gen("a message over the receive limit (4 MiB + 1 KB)",
        greq(text="y" * (MAX_RECV + 1024)), RE)
    add("Tokenize: a message over the receive limit",
        lambda: uu(d, TOKENIZE, fb(1, "z" * (MAX_RECV + 10))), RE)
    add("GenerateStream: a chunk over the receive limit",
        lambda: ss(d, GSTREAM, [hdr(fv(5, 2)), chunk(fb(1, "z" * (MAX_RECV + 10)))]), RE)

    # -- unknown methods and services
    for path in ["/infinitehip.v1.Generator/Nope", "/infinitehip.v1.Generator/generate",
                 "/nope.Service/Method", "/infinitehip.v1.Prefiller/Prefill",
                 "/infinitehip.v1.Generator/" + "N" * 2000, "/infinitehip.v1.Generator",
                 "/"]:
        add(f"unknown method {path[:48]!r}", lambda path=path: uu(d, path, b""), UI)
    add("unknown method on the prefill worker",
        lambda: uu(p, "/infinitehip.v1.Generator/Generate", b""), UI)

    # -- GenerateStream misuse
    def gs(name, parts, codes, extra=None, timeout=60):
        add(f"GenerateStream: {name}", lambda: ss(d, GSTREAM, parts, timeout), codes,
            extra or finished_ok)
    gs("half-close without any message", [], IA)
    gs("a chunk before the header", [chunk(fb(1, "Hi"))], IA)
    gs("an empty message (neither header nor chunk)", [b""], IA)
    gs("the header twice", [hdr(fv(5, 2)), hdr(fv(5, 2))], IA)
    gs("only a header with an empty prompt", [hdr(fv(5, 2))], IA)
    gs("a text header and a token chunk", [hdr(fb(1, "Hi"), fv(5, 2)),
                                           chunk(fm(2, packed(1, [1])))], IA)
    gs("a token header and a text chunk", [hdr(fm(3, packed(1, [1])), fv(5, 2)),
                                           chunk(fb(1, "Hi"))], IA)
    gs("a chat header and a token chunk", [hdr(chat([("user", "Hi")]), fv(5, 2)),
                                           chunk(fm(2, packed(1, [1])))], IA)
    gs("a text chunk then a chat chunk", [hdr(fv(5, 2)), chunk(fb(1, "Hi")),
                                          chunk(fm(3, fb(1, "user"), fb(2, "x")))], IA)
    gs("an empty chunk (no data)", [hdr(fb(1, "Hi"), fv(5, 2)), chunk()], IA)
    gs("chunks past --max-upload-bytes (4096)",
       [hdr(fv(5, 2))] + [chunk(fb(1, "w" * 1000)) for _ in range(6)], RE)
    gs("an error, then more chunks", [hdr(fv(5, 2)), chunk()] +
       [chunk(fb(1, "x"))] * 50, IA)
    gs("a chunk with invalid UTF-8", [hdr(fv(5, 2)), chunk(fb(1, b"\xe2\x28\xa1"))], IA)
    gs("a chat chunk role with invalid UTF-8",
       [hdr(fv(5, 2)), chunk(fm(3, fb(1, b"\xff"), fb(2, "x")))], IA)
    gs("a header with a NaN temperature", [hdr(fb(1, "Hi"), fv(5, 2), sampling(temperature=nan))],
       IA)
    gs("garbage bytes as the header", [b"\x0a\x05\xff\xff"], IA)
    gs("text header + 200 one-byte chunks", [hdr(fb(1, "Hi"), fv(5, 2), sampling(
        temperature=0.0))] + [chunk(fb(1, c)) for c in ("abcdefghij" * 20)], OK)
    gs("empty header + token chunks", [hdr(fv(5, 2), sampling(temperature=0.0))] +
       [chunk(fm(2, packed(1, [1, 2, 3]))) for _ in range(3)], OK)
    gs("chat chunks, append with no earlier turn", [hdr(fv(5, 2), sampling(temperature=0.0)),
                                                   chunk(fm(3, fb(2, "Hi")), fv(4, 1)),
                                                   chunk(fm(3, fb(1, "user"), fb(2, " there")),
                                                         fv(4, 1))], OK)
    gs("token chunks with an id out of range",
       [hdr(fv(5, 2)), chunk(fm(2, packed(1, [1, N_VOCAB])))], IA)
    gs("token chunks over --max-prompt-tokens",
       [hdr(fv(5, 2))] + [chunk(fm(2, packed(1, [1] * 100))) for _ in range(3)], RE)
    gs("4097 chat chunks", [hdr(fv(5, 2))] +
       [chunk(fm(3, fb(2, ""))) for _ in range(4097)], IA)
    add("Generate's bytes on GenerateStream (one message, then half-close)",
        lambda: ss(d, GSTREAM, [greq()]), {IA, OK})
    add("two messages on the unary Tokenize",
        lambda: ss(d, TOKENIZE, [fb(1, "a"), fb(1, "b")]), {OK, IA, SC.INTERNAL, UI})
    add("no message on the unary Tokenize", lambda: ss(d, TOKENIZE, []), IA)
    add("no message on server-streaming Generate", lambda: ss(d, GEN, []), IA)

    # -- Tokenize / ModelInfo / GetStats / Health
    def n_ids(packed_ids):
        n = i = 0
        while i < len(packed_ids or b""):
            _, i = rvarint(packed_ids, i)
            n += 1
        return n

    def tok_ids(r):
        ids = field(r.msgs[0], 1, b"") if r.msgs else b""
        return ids
    add("Tokenize: empty request", lambda: uu(d, TOKENIZE, b""), IA)
    add("Tokenize: empty text gives no tokens", lambda: uu(d, TOKENIZE, fb(1, "")), OK,
        lambda r: (tok_ids(r) in (b"", None), repr(r.msgs)))
    add("Tokenize: whitespace with pieces", lambda: uu(d, TOKENIZE, fb(1, "  \n\t") + fv(4, 1)),
        OK, lambda r: (len(tok_ids(r)) >= 1, repr(r.msgs)))
    add("Tokenize: invalid UTF-8", lambda: uu(d, TOKENIZE, fb(1, b"\xf0\x28\x8c\x28")), IA)
    add("Tokenize: chat content invalid UTF-8",
        lambda: uu(d, TOKENIZE, chat([("user", b"\xfe")])), IA)
    add("Tokenize: chat with no messages", lambda: uu(d, TOKENIZE, fm(2)), IA)
    add("Tokenize: chat with an unknown role", lambda: uu(d, TOKENIZE, chat([("robot", "x")])),
        OK)
    add("Tokenize: 200 KB of text with pieces",
        lambda: uu(d, TOKENIZE, fb(1, "hello world " * 17000) + fv(4, 1), timeout=60), OK,
        lambda r: (n_ids(tok_ids(r)) >= 17000 and
                   sum(1 for f, _, _ in parse(r.msgs[0]) if f == 2) == n_ids(tok_ids(r)),
                   f"{n_ids(tok_ids(r))} ids"))
    add("Tokenize: garbage", lambda: uu(d, TOKENIZE, b"\x12\xff\x01"), IA)
    add("Tokenize: unknown fields only", lambda: uu(d, TOKENIZE, fv(40, 1)), IA)
    add("ModelInfo: empty request", lambda: uu(d, MODELINFO, b""), OK,
        lambda r: (field(r.msgs[0], 4) == N_VOCAB, repr(r.msgs[0][:60])))
    add("ModelInfo: unknown fields", lambda: uu(d, MODELINFO, fb(3, "x") + fv(9, 9)), OK)
    add("ModelInfo: garbage", lambda: uu(d, MODELINFO, b"\xff\xff"), IA)
    add("ModelInfo: invalid UTF-8 in an unknown field (ignored)",
        lambda: uu(d, MODELINFO, fb(1, b"\xff")), OK)
    add("GetStats: prefix matching nothing", lambda: uu(d, STATS, fb(1, "zzz.")), OK)
    add("GetStats: prefix invalid UTF-8", lambda: uu(d, STATS, fb(1, b"\xc0")), IA)
    add("Health: unknown service", lambda: uu(d, HEALTH, fb(1, "no.such.Service")),
        {SC.NOT_FOUND})
    add("Health: service invalid UTF-8", lambda: uu(d, HEALTH, fb(1, b"\xff")), IA)
    add("Health (prefill): garbage", lambda: uu(p, HEALTH, b"\xff"), IA)

    # -- Prefiller.Prefill directly
    def pf(name, payload, codes, timeout=30, extra=None):
        add(f"Prefill: {name}", lambda: us(p, PREFILL, payload, timeout), codes, extra)
    pf("empty request", b"", IA)
    pf("no token ids", fb(1, "x"), IA)
    pf("token id -1", preq([1, -1]), IA)
    pf("token id n_vocab", preq([N_VOCAB]), IA)
    pf("over its --max-prompt-tokens (1100 ids)", preq([1] * 1100), RE)
    pf("kv_segment of another segment", preq([1, 2], fb(4, "other")), FP)
    pf("kv_segment /etc/passwd", preq([1, 2], fb(4, "/etc/passwd")), FP)
    pf("kv_segment ../../../etc", preq([1, 2], fb(4, "../../../etc")), FP)
    pf("model_fingerprint of another model", preq([1, 2], fb(5, "0123456789abcdef")), FP)
    # kv_segment_id (fixed64, field 10): another segment's id is refused even though the path
    # matches (two pods' segments have the same path); its own id is accepted
    own_id = c.segment_id
    pf("kv_segment_id of another segment", preq([1, 2], f64(10, own_id ^ 1)), FP)
    pf("kv_segment_id 2^64-1", preq([1, 2], f64(10, (1 << 64) - 1)), FP)
    pf("kv_segment_id of its own segment", preq([1, 2], f64(10, own_id),
                                                fb(4, os.path.join(c.dir, "ihip-ihip"))), {OK, RE},
       extra=lambda r: (b"".join(r.msgs).find(own_id.to_bytes(8, "little")) >= 0,
                        "the handle carries segment_id"))
    pf("model_fingerprint garbage", preq([1, 2], fb(5, "not hex at all")), FP)
    pf("attention preset unknown", preq([1, 2], fm(3, fb(1, "zzz"))), IA)
    pf("attention config_json not an object", preq([1, 2], fm(3, fb(2, "[1]"))), IA)
    pf("attention config_json = /etc/passwd", preq([1, 2], fm(3, fb(2, "/etc/passwd"))), IA)

    def fifo_case():
        r = us(p, PREFILL, preq([1, 2], fm(3, fb(2, c.fifo))), timeout=5)
        try:  # succeeds only if the worker is blocked opening the FIFO: unblock it
            fd = os.open(c.fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"{}")
            os.close(fd)
            r.details += " [the worker was blocked opening the FIFO]"
            r.blocked = True
        except OSError:
            r.blocked = False
        return r
    add("Prefill: attention config_json naming a FIFO (must not block)", fifo_case, IA,
        lambda r: (not r.blocked, r.details))
    pf("config_json with preset dense", preq([1, 2], fm(3, fb(1, "dense"), fb(2, "{}"))), IA)
    pf("request_id invalid UTF-8", fb(1, b"\xff") + packed(2, [1]), IA)
    pf("kv_segment invalid UTF-8", preq([1], fb(4, b"\xed\xbf\xbf")), IA)
    pf("garbage", b"\x12\x05\x01", IA)
    pf("a valid small prefill (lease handed over, then released)",
       preq([1, 2, 3, 4], fv(8, 1)), OK,
       extra=lambda r: (len(r.msgs) >= 1 and parse(r.msgs[-1])[0][0] == 2, repr(r.msgs[-1:])))
    pf("reserve_decode_tokens 2^32-1 (clamped to its --ctx)", preq([1, 2, 3], fv(6, 0xFFFFFFFF)),
       {OK, RE})
    pf("no_prefix_reuse, progress_interval_ms 1, kv_segment = its own path",
       preq([1, 2, 3], fv(7, 1), fv(9, 1), fb(4, os.path.join(c.dir, "ihip-ihip"))), {OK, FP})
    add("Prefill: deadline 1 ms", lambda: us(p, PREFILL, preq([7] * 40), timeout=0.001), DE)

    def pf_cancel():
        it = p.unary_stream(PREFILL, IDENT, IDENT)(preq([9] * 40), timeout=30)
        it.cancel()
        try:
            list(it)
            return Res(OK)
        except grpc.RpcError as e:
            return _err(e)
    add("Prefill: cancelled right after sending", pf_cancel, CA)

    # -- deadlines and cancellation on the decode worker
    add("Generate: deadline 1 ms", lambda: us(d, GEN, greq(mt=24), timeout=0.001), DE)
    add("Generate: deadline 0", lambda: us(d, GEN, greq(mt=24), timeout=0), DE)
    add("GenerateStream: deadline 1 ms",
        lambda: ss(d, GSTREAM, [hdr(fb(1, "Hi"), fv(5, 24))], timeout=0.001), DE)
    add("Tokenize: deadline 1 ms", lambda: uu(d, TOKENIZE, fb(1, "hi " * 2000), timeout=0.001),
        {DE, OK})
    add("ModelInfo: deadline 1 ms", lambda: uu(d, MODELINFO, b"", timeout=0.001), {DE, OK})
    add("Generate: deadline 300 ms (a 200-token prompt and 24 tokens take longer)",
        lambda: us(d, GEN, greq(mt=24, text="Once upon a time" + " word" * 200), timeout=0.3),
        DE)

    def cancel_after(n_msgs, payload, kinds=(1, 2, 3)):
        def run():
            it = d.unary_stream(GEN, IDENT, IDENT)(payload, timeout=60)
            try:
                got = 0
                if n_msgs:
                    for m in it:
                        if parse(m)[0][0] in kinds:
                            got += 1
                            if got >= n_msgs:
                                break
                it.cancel()
                list(it)
                return Res(OK)
            except grpc.RpcError as e:
                return _err(e)
        return run
    add("Generate: cancelled right after sending", cancel_after(0, greq(mt=24)), CA)
    add("Generate: cancelled after the first Progress", cancel_after(1, greq(mt=24), (2,)), CA)
    add("Generate: cancelled after the first Piece", cancel_after(1, greq(mt=24), (1,)), CA)

    def close_channel():
        ch = grpc.insecure_channel(c.dec.addr)
        it = ch.unary_stream(GEN, IDENT, IDENT)(greq(mt=24, text="Hello there"), timeout=60)
        try:
            for m in it:
                if parse(m)[0][0] == 1:
                    break
            ch.close()
            list(it)
            return Res(OK)
        except grpc.RpcError as e:
            return _err(e)
    add("Generate: client closes its channel mid-decode", close_channel, CA)

    def upload_cancel():
        ev = threading.Event()

        def parts():
            yield hdr(fv(5, 2))
            yield chunk(fb(1, "abc"))
            ev.wait(10)
        it = d.stream_stream(GSTREAM, IDENT, IDENT)(parts(), timeout=30)
        time.sleep(0.2)
        it.cancel()
        ev.set()
        try:
            list(it)
            return Res(OK)
        except grpc.RpcError as e:
            return _err(e)
    add("GenerateStream: cancelled mid-upload", upload_cancel, CA)

    # -- bursts: many calls at once
    def burst(n, payload):
        def run():
            out = [None] * n

            def one(i):
                out[i] = us(d, GEN, payload, 120)
            ths = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            return out
        return run

    def all_codes(codes, need_ok=False):
        def thunk_wrap(run):
            def go():
                rs = run()
                bad = [r for r in rs if r.code not in codes or
                       (r.code == RE and "retry-delay-ms" not in r.md) or not finished_ok(r)[0]]
                n_ok = sum(r.code == OK for r in rs)
                summary = ",".join(sorted({r.code.name for r in rs}))
                good = not bad and (n_ok > 0 or not need_ok)
                return Res(OK if good else None, f"{summary}; bad: {bad[:3]}")
            return go
        return thunk_wrap
    add("burst: 40 concurrent invalid Generates all INVALID_ARGUMENT",
        all_codes({IA})(burst(40, greq(samp={"top_p": 0.0}))), OK)
    add("burst: 12 concurrent valid Generates (--max-seqs 6): OK or RESOURCE_EXHAUSTED "
        "with retry-delay-ms", all_codes({OK, RE}, True)(burst(12, greq(mt=4))), OK)

    # -- raw TCP: the server drops the connection and keeps serving others
    def tcp(port, data, expect_close=True):
        def run():
            closed = tcp_closed(port, data)
            serving = us(d, GEN, greq(mt=1), 60).code == OK
            ok = (expect_close is None or closed == expect_close) and serving
            return Res(OK if ok else None, f"closed={closed} serving={serving}")
        return run
    settings = h2frame(4, 0, 0, b"")
    for who, port in (("decode", c.dec.port), ("prefill", c.pre.port)):
        add(f"TCP ({who}): HTTP/1.1 request", tcp(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), OK)
        add(f"TCP ({who}): 4 KB of random bytes", tcp(port, os.urandom(4096)), OK)
        add(f"TCP ({who}): bogus HTTP/2 preface",
            tcp(port, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + b"\x00" * 64), OK)
    add("TCP: preface + HEADERS with garbage HPACK",
        tcp(c.dec.port, PREFACE + settings + h2frame(1, 0x4, 1, b"\xff\xff\xff\xff\xff")), OK)
    # gRPC core ignores a DATA frame on stream 0 instead of closing (RFC 9113 says
    # PROTOCOL_ERROR): either is accepted, as long as others are served.
    add("TCP: preface + DATA on stream 0",
        tcp(c.dec.port, PREFACE + settings + h2frame(0, 0, 0, b"hello"), None), OK)
    add("TCP: preface + a frame of 16 MiB announced length",
        tcp(c.dec.port, PREFACE + settings + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"), OK)
    add("TCP: preface + SETTINGS with a bad length",
        tcp(c.dec.port, PREFACE + h2frame(4, 0, 0, b"\x00\x01\x00")), OK)

    def idle_conns():
        socks = [socket.create_connection(("127.0.0.1", c.dec.port)) for _ in range(20)]
        try:
            socks[0].sendall(PREFACE[:10])
            t0 = time.monotonic()
            r = uu(d, MODELINFO, b"", timeout=10)
            return Res(r.code if time.monotonic() - t0 < 5 else None, r.details)
        finally:
            for s in socks:
                s.close()
    add("TCP: 20 idle / half-preface connections do not block others", idle_conns, OK)
    return cases


def stats(c):
    r = uu(c.dch, STATS, b"", timeout=10)
    out = {}
    for f, _, m in (parse(r.msgs[0]) if r.code == OK else []):
        if f == 4:
            name = field(m, 1, b"").decode()
            v = field(m, 2, b"\x00" * 8)
            out[name] = struct.unpack("<d", v)[0]
    return out


def kv(c, cmd):
    r = subprocess.run([os.path.join(BIN, "ihip-kv"), cmd, "ihip", "--dir", c.dir, "--json"],
                       capture_output=True, text=True, timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr}


def wait_for(pred, timeout=10.0, step=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def settled(c):
    """No sequence admitted on the decode worker (cancelled ones dropped)."""
    return wait_for(lambda: stats(c).get("decode.sequences_admitted", 1) == 0, 20)


def healthy(ch):
    r = uu(ch, HEALTH, b"", timeout=5)
    return r.code == OK and field(r.msgs[0], 1) == 1


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
    t_start = time.monotonic()
    c = Ctx()
    c.dir = tempfile.mkdtemp(prefix="ihip-malformed-")
    c.fifo = os.path.join(c.dir, "fifo.json")
    os.mkfifo(c.fifo)
    c.pre = c.dec = None
    failures = []
    n_ok = n_cases = 0
    try:
        pport = free_port()
        c.pre = Worker("ihip-prefill-worker", [
            "--model", MODEL, "--listen", f"127.0.0.1:{pport}", "--kv-dir", c.dir, "--kv-create",
            "--kv-blocks", "256", "--threads", THREADS, "--handoff-ms", "300",
            "--max-concurrent", "4", "--ctx", "1024"])
        c.dec = Worker("ihip-decode-worker", [
            "--model", MODEL, "--prefill", f"127.0.0.1:{pport}", "--kv-dir", c.dir,
            "--threads", THREADS, "--ctx", "512", "--max-seqs", "6", "--max-prompt-tokens", "256",
            "--max-tokens-limit", "24", "--default-max-tokens", "3", "--max-upload-bytes", "4096",
            "--health-timeout-ms", "1000"])
        c.dch = grpc.insecure_channel(c.dec.addr)
        c.pch = grpc.insecure_channel(c.pre.addr)
        if not (wait_for(lambda: healthy(c.pch), 90) and wait_for(lambda: healthy(c.dch), 90)):
            print("FAIL workers did not become SERVING")
            return 1
        prompt = "The capital of France is"
        base = us(c.dch, GEN, greq(text=prompt, mt=8), 120)
        base_text = gen_summary(base.msgs)[0]
        print(f"     baseline greedy: {base.code.name} {base_text!r}")
        rss0 = (c.pre.rss_kb(), c.dec.rss_kb())
        c.segment_id = int(kv(c, "stats").get("segment_id", 0))
        cases = build_cases(c)
        print(f"     {len(cases)} cases built ({time.monotonic() - t_start:.1f} s)", flush=True)
        rss_pass = []
        for pass_no in range(1, PASSES + 1):
            # Pass 2 repeats every case: the workers' RSS must stay flat (a per-request leak
            # shows here, while pass 1 also warms allocators and arenas up).
            died = False
            for name, thunk, codes, extra in cases:
                n_cases += 1
                t0 = time.monotonic()
                try:
                    r = thunk()
                except Exception as e:  # the test's own bug must not hide the others
                    r = Res(None, f"exception {e!r}")
                good = r.code in codes
                why = ""
                if good and extra:
                    good, why = extra(r)
                alive = c.pre.alive() and c.dec.alive()
                dt = time.monotonic() - t0
                if good and alive:
                    n_ok += 1
                    if pass_no == 1:
                        print(f"ok   {name}: {r.code.name} ({dt:.2f} s)", flush=True)
                else:
                    want = "/".join(sorted(x.name for x in codes))
                    msg = f"FAIL [pass {pass_no}] {name}: got {r!r}, want {want} {why}" + \
                          ("" if alive else " — A WORKER DIED")
                    print(msg, flush=True)
                    failures.append(msg)
                    if not alive:
                        died = True
                        break
                if r.code in (CA, DE) or name.startswith("TCP"):
                    settled(c)
            settled(c)
            rss_pass.append((c.pre.rss_kb(), c.dec.rss_kb()))
            print(f"     pass {pass_no}: {n_cases} cases so far, {n_ok} ok "
                  f"({time.monotonic() - t_start:.1f} s); RSS MB prefill "
                  f"{rss_pass[-1][0] / 1024:.0f}, decode {rss_pass[-1][1] / 1024:.0f}", flush=True)
            if died:
                break
        print(f"{n_cases} cases, {n_ok} ok ({len(cases)} distinct, {PASSES} passes; "
              f"{time.monotonic() - t_start:.1f} s)", flush=True)

        # ---- after the cases
        def check(name, cond, detail=""):
            print(f"{'ok  ' if cond else 'FAIL'} {name} {'' if cond else detail}", flush=True)
            if not cond:
                failures.append(f"{name} {detail}")
        check("both workers still running", c.pre.alive() and c.dec.alive())
        check("decode worker health SERVING", healthy(c.dch))
        check("prefill worker health SERVING", healthy(c.pch))
        after = us(c.dch, GEN, greq(text=prompt, mt=8), 120)
        text = gen_summary(after.msgs)[0]
        ok_shape = finished_ok(after)[0]
        check("a normal greedy Generate still works and equals the one before the cases",
              after.code == OK and ok_shape and text == base_text and text,
              f"{after!r} {text!r} vs {base_text!r}")
        want = reference(prompt, 8)
        check("and equals a fresh `ihip generate --temp 0` run", text == want,
              f"{text!r} vs {want!r}")
        check("decode worker: no sequence admitted", settled(c), str(stats(c)))
        # The decode worker may keep finished sequences in the store on purpose (--kv-retain
        # finished: one lease each, decode.kv_retained); anything above that is a leak. The
        # prefill worker's hand-over leases expire after --handoff-ms.
        def live_ok():
            s, retained = kv(c, "stats"), stats(c).get("decode.kv_retained", 0)
            return s.get("leases", -1) <= retained and s.get("seqs", {}).get("writing") == 0
        check("ihip-kv: leases <= retained sequences, no WRITING sequence", wait_for(live_ok, 40),
              f"{kv(c, 'stats')} retained {stats(c).get('decode.kv_retained')}")
        ls = kv(c, "ls")
        seqs = ls.get("seqs")
        check(f"ihip-kv ls: none of the {len(seqs or [])} sequences WRITING, at most one lease "
              "each", isinstance(seqs, list) and all(q.get("state") != "writing" and
                                                      q.get("leases", 9) <= 1 for q in seqs),
              str(ls)[:500])
        r = subprocess.run([os.path.join(BIN, "ihip-kv"), "check", "ihip", "--dir", c.dir],
                           capture_output=True, text=True, timeout=30)
        check("ihip-kv check passes", r.returncode == 0, r.stdout + r.stderr)
        rss1 = (c.pre.rss_kb(), c.dec.rss_kb())
        grow = [(b - a) / 1024 for a, b in zip(rss0, rss1)]
        print(f"     RSS MB prefill {rss0[0] / 1024:.0f} -> {rss1[0] / 1024:.0f}, decode "
              f"{rss0[1] / 1024:.0f} -> {rss1[1] / 1024:.0f}")
        check(f"RSS grew by less than {RSS_GROWTH_MB} MB in each worker over all passes",
              all(g < RSS_GROWTH_MB for g in grow), str(grow))
        if len(rss_pass) >= 2:
            grow2 = [(b - a) / 1024 for a, b in zip(rss_pass[0], rss_pass[-1])]
            check(f"RSS grew by less than {RSS_PASS2_MB} MB in each worker after pass 1 "
                  "(no per-request leak)", all(g < RSS_PASS2_MB for g in grow2), str(grow2))
        c.dch.close()
        c.pch.close()
        rc_d = c.dec.stop()
        check("decode worker exits 0 on SIGTERM", rc_d == 0, str(rc_d))
        check("after its shutdown: no lease and no WRITING sequence left (ihip-kv stats)",
              wait_for(lambda: kv(c, "stats").get("leases") == 0 and
                       kv(c, "stats").get("seqs", {}).get("writing") == 0, 20),
              str(kv(c, "stats")))
        rc_p = c.pre.stop()
        check("prefill worker exits 0 on SIGTERM", rc_p == 0, str(rc_p))
        r = subprocess.run([os.path.join(BIN, "ihip-kv"), "check", "ihip", "--dir", c.dir],
                           capture_output=True, text=True, timeout=30)
        check("ihip-kv check passes after both exited", r.returncode == 0, r.stdout + r.stderr)
        bad = re.compile(r"AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|"
                         r"runtime error:|Assertion .* failed|SUMMARY: |Segmentation fault|"
                         r"double free|heap-use-after-free|stack-overflow|\babort")
        for w in (c.pre, c.dec):
            hits = [line for line in w.log if bad.search(line)]
            check(f"{w.name} stderr: no sanitizer / assertion text", not hits, "".join(hits[:5]))
    finally:
        for w in (c.dec, c.pre):
            if w:
                if failures:
                    sys.stdout.write(f"---- {w.name} stderr (last 15 lines)\n" +
                                     "".join(w.log[-15:]))
                w.stop(signal.SIGKILL if w.alive() and failures else signal.SIGTERM)
        shutil.rmtree(c.dir, ignore_errors=True)
    print(f"{time.monotonic() - t_start:.1f} s")
    print(f"{n_ok} passed, {len(failures)} failed")
    return 1 if failures or n_ok != n_cases else 0


if __name__ == "__main__":
    sys.exit(main())
