"""Bad input to the `ihip` CLI: each case must print one clear `ihip: error:` message naming the
problem and exit with a non-zero status — never a crash (signal), hang or sanitizer report.
Also a positive smoke run of generate / info / tokenize on the real model."""
import json
import os
import subprocess
import sys
import tempfile

SRC = os.environ.get("IHIP_SRC", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BIN = os.path.join(os.environ.get("IHIP_BIN", os.path.join(SRC, "build", "bin")), "ihip")
MODEL = os.environ.get("IHIP_MODEL", os.path.join(SRC, "models", "SmolLM2-135M-Instruct-Q4_1.gguf"))
if not (os.path.exists(BIN) and os.path.exists(MODEL)):
    print("skip: binary or model missing\n0 passed, 0 failed, 1 skipped")
    sys.exit(77)

import numpy as np  # noqa: E402
import gguf  # noqa: E402

passed = failed = 0


def run(args, timeout=120):
    return subprocess.run([BIN] + args, capture_output=True, timeout=timeout)


def expect_error(name, args, phrase):
    global passed, failed
    try:
        r = run(args)
    except subprocess.TimeoutExpired:
        print(f"FAIL {name}: timed out")
        failed += 1
        return
    err = r.stderr.decode(errors="replace")
    ok = (r.returncode > 0 and "ihip: error:" in err and phrase.lower() in err.lower()
          and "Sanitizer" not in err and "runtime error" not in err)
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name}: rc={r.returncode} want phrase {phrase!r}\n  stderr: {err[:500]}")


def tiny_gguf(path, arch="llama", embd_type=None):
    """A tiny llama-shaped GGUF (1 layer, 64 dims) for loader errors."""
    w = gguf.GGUFWriter(path, arch)
    E, F, V = 64, 128, 256
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(0)
    if embd_type is None:
        w.add_tensor("token_embd.weight", rng.standard_normal((V, E)).astype(np.float32))
    else:
        qt, bs, ts = embd_type
        row = (E // bs) * ts
        w.add_tensor("token_embd.weight", np.zeros((V, row), dtype=np.uint8), raw_shape=(V, row), raw_dtype=qt)
    w.add_tensor("output_norm.weight", np.ones(E, dtype=np.float32))
    for n, shape in [("attn_norm", (E,)), ("ffn_norm", (E,)), ("attn_q", (E, E)), ("attn_k", (32, E)),
                     ("attn_v", (32, E)), ("attn_output", (E, E)), ("ffn_gate", (F, E)), ("ffn_up", (F, E)),
                     ("ffn_down", (E, F))]:
        w.add_tensor(f"blk.0.{n}.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


with tempfile.TemporaryDirectory() as td:
    P = os.path.join
    expect_error("missing model", ["generate", "-m", P(td, "nope.gguf"), "-p", "hi"], "nope.gguf")
    data = open(MODEL, "rb").read(4 << 20)
    open(P(td, "trunc.gguf"), "wb").write(data[:3 << 20])
    expect_error("truncated model", ["generate", "-m", P(td, "trunc.gguf"), "-p", "hi"], "past end of file")
    open(P(td, "magic.gguf"), "wb").write(b"GGUX" + data[4:1 << 16])
    expect_error("bad magic", ["generate", "-m", P(td, "magic.gguf"), "-p", "hi"], "magic")
    bad = bytearray(data[:1 << 20])
    bad[16:24] = (1 << 62).to_bytes(8, "little")  # kv_count
    open(P(td, "kvcount.gguf"), "wb").write(bytes(bad))
    expect_error("corrupt kv count", ["generate", "-m", P(td, "kvcount.gguf"), "-p", "hi"], "gguf")
    open(P(td, "empty.gguf"), "wb").write(b"")
    expect_error("empty file", ["info", "-m", P(td, "empty.gguf")], "gguf")
    tiny_gguf(P(td, "gpt2.gguf"), arch="gpt2")
    expect_error("unsupported architecture", ["generate", "-m", P(td, "gpt2.gguf"), "-p", "hi"], "gpt2")
    tiny_gguf(P(td, "iq4.gguf"), embd_type=(gguf.GGMLQuantizationType.IQ4_NL, 32, 18))
    expect_error("unsupported quantisation", ["generate", "-m", P(td, "iq4.gguf"), "-p", "hi"], "IQ4_NL")

    M = ["-m", MODEL]
    expect_error("prompt longer than ctx", ["generate"] + M + ["--ctx", "16", "-p", "word " * 40], "--ctx")
    open(P(td, "bad-utf8.txt"), "wb").write(b"hello \xff\xfe world")
    expect_error("invalid UTF-8", ["generate"] + M + ["-f", P(td, "bad-utf8.txt")], "UTF-8")
    expect_error("-n 0", ["generate"] + M + ["-p", "hi", "-n", "0"], "-n")
    expect_error("-n negative", ["generate"] + M + ["-p", "hi", "-n", "-4"], "-n")
    expect_error("temp NaN", ["generate"] + M + ["-p", "hi", "--temp", "nan"], "--temp")
    expect_error("temp negative", ["generate"] + M + ["-p", "hi", "--temp", "-1"], "temperature")
    expect_error("top-p NaN", ["generate"] + M + ["-p", "hi", "--top-p", "NaN"], "--top-p")
    expect_error("top-p > 1", ["generate"] + M + ["-p", "hi", "--top-p", "1.5"], "top-p")
    expect_error("min-p negative", ["generate"] + M + ["-p", "hi", "--min-p", "-0.1"], "min-p")
    expect_error("top-k negative", ["generate"] + M + ["-p", "hi", "--top-k", "-1"], "--top-k")
    expect_error("seed garbage", ["generate"] + M + ["-p", "hi", "--seed", "12abc"], "--seed")
    expect_error("empty prompt", ["generate"] + M + ["-p", ""], "empty")
    expect_error("no prompt", ["generate"] + M, "prompt")
    expect_error("missing prompt file", ["generate"] + M + ["-f", P(td, "none.txt")], "none.txt")
    expect_error("unknown option", ["generate"] + M + ["-p", "hi", "--bogus"], "--bogus")
    expect_error("option without value", ["generate"] + M + ["-p"], "-p")
    expect_error("bad attention", ["generate"] + M + ["-p", "hi", "--attention", "sparse"], "--attention")
    expect_error("unknown HiP preset", ["generate"] + M + ["-p", "hi", "--attention", "hip", "--hip-preset", "warp"], "warp")
    expect_error("HiP config bad JSON", ["generate"] + M + ["-p", "hi", "--attention", "hip", "--hip-config", "{\"sink_token_size\": }"], "HiP")
    expect_error("HiP config unknown key", ["generate"] + M + ["-p", "hi", "--attention", "hip", "--hip-config", "{\"bogus_key\": 1}"], "bogus_key")
    expect_error("HiP preset without hip", ["generate"] + M + ["-p", "hi", "--hip-preset", "fast"], "--attention hip")

# positive smoke runs
r = run(["generate", "-m", MODEL, "-p", "The capital of France is", "-n", "8", "--temp", "0"])
if r.returncode == 0 and len(r.stdout.strip()) > 0 and b"decode" in r.stderr:
    passed += 1
else:
    failed += 1
    print("FAIL generate smoke:", r.returncode, r.stdout[:200], r.stderr[-500:])
r = run(["generate", "-m", MODEL, "-p", "The capital of France is", "-n", "8", "--temp", "0",
         "--attention", "hip", "--hip-preset", "flash"])
if r.returncode == 0 and len(r.stdout.strip()) > 0 and b"hip attention" in r.stderr:
    passed += 1
else:
    failed += 1
    print("FAIL generate --attention hip smoke:", r.returncode, r.stdout[:200], r.stderr[-500:])
r = run(["info", "-m", MODEL, "--json"])
try:
    j = json.loads(r.stdout)
    ok = r.returncode == 0 and len(j["tensors"]) == 272
except Exception as e:  # noqa: BLE001
    ok = False
    print("info json:", e)
passed += ok
failed += not ok
r = run(["tokenize", "-m", MODEL, "-p", "Hello world"])
ok = r.returncode == 0 and len(r.stdout.split()) >= 2
passed += ok
failed += not ok
print(f"{passed} passed, {failed} failed")
sys.exit(0 if failed == 0 else 1)
