#!/usr/bin/env python3
"""Bit-exact dequantisation of our tensor module (libihip.so, tn_dequant_row) against the gguf
Python package's numpy dequantisation (gguf.quants.dequantize), the reference format spec.

1. Every tensor of the real model: our dequantisation of the mmapped tensor data must equal the
   package's float32 array bit for bit.
2. Synthetic blocks of every supported type: data quantised by the package where it can quantise
   that type, plus random bytes with sane fp16 scales (all bit patterns of quants and scales).
3. The type table (names, block sizes, byte sizes) against gguf.constants.

Exit 0 pass, 1 fail, 77 skip (venv / model / library absent).
"""
import ctypes
import mmap
import os
import sys

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as QT
    from gguf.constants import GGML_QUANT_SIZES
except ImportError as e:  # venv not ready
    print(f"skip: {e}")
    sys.exit(77)

SRC = os.environ.get("IHIP_SRC", os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.environ.get("IHIP_MODEL", os.path.join(SRC, "models", "SmolLM2-135M-Instruct-Q4_1.gguf"))
BIN = os.environ.get("IHIP_BIN", os.path.join(SRC, "build", "bin"))
LIB = os.path.join(os.path.dirname(os.path.abspath(BIN)), "lib", "libihip.so")

passed = failed = 0


def check(ok, msg):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {msg}")


def load_lib():
    lib = ctypes.CDLL(LIB)
    lib.tn_dequant_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.tn_dequant_row.restype = None
    lib.tn_type_name.argtypes = [ctypes.c_int]
    lib.tn_type_name.restype = ctypes.c_char_p
    lib.tn_type_block.argtypes = [ctypes.c_int]
    lib.tn_type_block.restype = ctypes.c_int
    lib.tn_type_size.argtypes = [ctypes.c_int]
    lib.tn_type_size.restype = ctypes.c_size_t
    lib.tn_type_supported.argtypes = [ctypes.c_int]
    lib.tn_type_supported.restype = ctypes.c_bool
    lib.tn_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.tn_row_size.restype = ctypes.c_int64
    return lib


def ours(lib, qtype, ptr, n):
    out = np.empty(n, dtype=np.float32)
    lib.tn_dequant_row(int(qtype), ptr, out.ctypes.data, n)
    return out


def same_bits(a, b):
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    b = np.ascontiguousarray(b, dtype=np.float32).reshape(-1)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def first_diff(a, b):
    a = a.reshape(-1)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    idx = np.nonzero(a.view(np.uint32) != b.view(np.uint32))[0]
    if len(idx) == 0:
        return "shapes differ"
    i = idx[0]
    return f"{len(idx)} elements differ, first at {i}: ours {a[i]!r} vs gguf {b[i]!r}"


# ---- 1. every tensor of the real model ----------------------------------------------------------

def test_model(lib):
    reader = gguf.GGUFReader(MODEL)
    with open(MODEL, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mm, dtype=np.uint8)
        base = buf.ctypes.data
        kinds = {}
        for t in reader.tensors:
            n = int(np.prod([int(d) for d in t.shape]))
            qt = t.tensor_type
            kinds[qt.name] = kinds.get(qt.name, 0) + 1
            check(lib.tn_row_size(int(qt), n) == t.n_bytes, f"{t.name}: row size {lib.tn_row_size(int(qt), n)} vs {t.n_bytes}")
            mine = ours(lib, qt, base + t.data_offset, n)
            ref = gguf.quants.dequantize(t.data, qt)
            ok = same_bits(mine, ref)
            check(ok, f"{t.name} ({qt.name}, {n} elements): {'' if ok else first_diff(mine, ref)}")
        del buf
        mm.close()
    print(f"model: {len(reader.tensors)} tensors compared ({', '.join(f'{k} x{v}' for k, v in sorted(kinds.items()))})")


# ---- 2. synthetic blocks of every supported type ------------------------------------------------

# byte offsets of each block's fp16 scales (GGUF layout)
FP16_FIELDS = {
    QT.Q4_0: [0], QT.Q5_0: [0], QT.Q8_0: [0],
    QT.Q4_1: [0, 2], QT.Q5_1: [0, 2], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2],
    QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q6_K: [208],
}
QUANTIZABLE = {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}
SUPPORTED = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
             QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def float_data(rng, kind, n):
    if kind == 0:
        return rng.standard_normal(n).astype(np.float32) * 0.05
    if kind == 1:
        x = rng.uniform(-1, 1, n).astype(np.float32)
        x[rng.integers(0, n, n // 50)] *= 40  # outliers
        return x
    if kind == 2:
        x = rng.standard_normal(n).astype(np.float32)
        x[: n // 4] = 0  # all-zero blocks
        return x
    if kind == 3:
        return rng.uniform(0.5, 3.0, n).astype(np.float32)  # all positive (min > 0)
    return (rng.standard_normal(n) * 1000).astype(np.float32)


def random_blocks(rng, qt, nblocks):
    bs, ts = GGML_QUANT_SIZES[qt]
    if qt in (QT.F32, QT.F16, QT.BF16):
        x = (rng.standard_normal(nblocks) * 10).astype(np.float32)
        return gguf.quants.quantize(x, qt).view(np.uint8).reshape(-1)
    raw = rng.integers(0, 256, (nblocks, ts), dtype=np.uint8)
    for off in FP16_FIELDS[qt]:
        scales = (rng.uniform(-0.1, 0.1, nblocks)).astype(np.float16)
        scales[::7] = np.float16(0)
        scales[1::11] = np.float16(6.0e-6)  # fp16 subnormal scale
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(nblocks, 2)
    return raw.reshape(-1)


def test_synthetic(lib):
    rng = np.random.default_rng(1234)
    for qt in SUPPORTED:
        bs, ts = GGML_QUANT_SIZES[qt]
        n = 256 * 24
        cases = []
        if qt in QUANTIZABLE:
            for kind in range(5):
                x = float_data(rng, kind, n).reshape(8, -1)
                data = np.ascontiguousarray(gguf.quants.quantize(x, qt)).view(np.uint8).reshape(-1)
                cases.append((f"quantised kind {kind}", data))
        for rep in range(3):
            cases.append((f"random bytes #{rep}", random_blocks(rng, qt, n // bs)))
        for label, data in cases:
            data = np.ascontiguousarray(data)
            nel = data.size // ts * bs
            mine = ours(lib, qt, data.ctypes.data, nel)
            ref = gguf.quants.dequantize(data, qt)
            ok = same_bits(mine, ref)
            check(ok, f"synthetic {qt.name} {label}: {'' if ok else first_diff(mine, ref)}")
    print(f"synthetic: {len(SUPPORTED)} types compared")


# ---- 3. type table --------------------------------------------------------------------------------

def test_table(lib):
    for qt in QT:
        name = lib.tn_type_name(int(qt))
        check(name is not None and name.decode() == qt.name, f"name of {int(qt)}: {name} vs {qt.name}")
        bs, ts = GGML_QUANT_SIZES[qt]
        if qt == QT.Q8_1:
            # gguf 0.17 still lists the old float d/s layout (40 bytes); ggml's block_q8_1 is
            # fp16 d + fp16 s + 32 int8 = 36 bytes. Q8_1 is never stored in files.
            ts = 36
        check(lib.tn_type_block(int(qt)) == bs and lib.tn_type_size(int(qt)) == ts,
              f"{qt.name}: block/size {lib.tn_type_block(int(qt))}/{lib.tn_type_size(int(qt))} vs {bs}/{ts}")
        check(bool(lib.tn_type_supported(int(qt))) == (qt in SUPPORTED), f"{qt.name} supported flag")
    for bad in (-1, 4, 5, 31, 36, 40, 64, 1000):
        check(lib.tn_type_name(bad) is None and lib.tn_type_size(bad) == 0, f"id {bad} must be unknown")


def main():
    if not os.path.exists(MODEL):
        print(f"skip: model {MODEL} not found")
        return 77
    if not os.path.exists(LIB):
        print(f"FAIL: {LIB} not built")
        print("0 passed, 1 failed")
        return 1
    lib = load_lib()
    test_table(lib)
    test_synthetic(lib)
    test_model(lib)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
