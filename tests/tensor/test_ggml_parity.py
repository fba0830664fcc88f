#!/usr/bin/env python3
"""Our activation quantisation and dot products against llama.cpp's own CPU code, as shipped in
llama-cpp-python's libggml-cpu.so (ggml_get_type_traits_cpu: from_float = the activation
quantiser ggml's matmul runs, vec_dot = its dot product for this CPU).

1. tn_quantize_row(Q8_0 / Q8_1 / Q8_K / F16 / BF16) must produce the same bytes as ggml's
   from_float for that type — random data, outliers, exact .5 ties, zero blocks.
2. tn_vec_dot must agree with ggml's vec_dot on the same bytes for every supported weight type,
   within 1e-5 of the sum of |products| (the summation order differs).

Exit 0 pass, 1 fail, 77 skip (venv or llama_cpp's libraries absent).
"""
import ctypes
import importlib.util
import os
import sys

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as QT
    from gguf.constants import GGML_QUANT_SIZES
except ImportError as e:
    print(f"skip: {e}")
    sys.exit(77)

SRC = os.environ.get("IHIP_SRC", os.path.join(os.path.dirname(__file__), "..", ".."))
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


class TypeTraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def load_ggml():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    libdir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    base = os.path.join(libdir, "libggml-base.so")
    cpu = os.path.join(libdir, "libggml-cpu.so")
    if not (os.path.exists(base) and os.path.exists(cpu)):
        return None
    ctypes.CDLL(base, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(cpu, mode=ctypes.RTLD_GLOBAL)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCpu)
    lib.ggml_cpu_init.argtypes = []
    lib.ggml_cpu_init()
    return lib


def load_ours():
    lib = ctypes.CDLL(LIB)
    lib.tn_quantize_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.tn_quantize_row.restype = None
    lib.tn_quantize_weight_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.tn_quantize_weight_row.restype = None
    lib.tn_vec_dot.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.tn_vec_dot.restype = ctypes.c_float
    lib.tn_vec_dot_type.argtypes = [ctypes.c_int]
    lib.tn_vec_dot_type.restype = ctypes.c_int
    lib.tn_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.tn_row_size.restype = ctypes.c_int64
    lib.tn_dequant_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.tn_dequant_row.restype = None
    lib.tn_simd_level.restype = ctypes.c_int
    lib.tn_simd_name.argtypes = [ctypes.c_int]
    lib.tn_simd_name.restype = ctypes.c_char_p
    return lib


def act_data(rng, kind, n):
    if kind == 0:
        return rng.standard_normal(n).astype(np.float32)
    if kind == 1:
        x = rng.uniform(-1, 1, n).astype(np.float32)
        x[rng.integers(0, n, n // 40)] *= 50.0
        return x
    if kind == 2:  # exact .5 ties: one ±127 per 32 (and per 256) makes the scale exactly 1
        x = (rng.integers(-20, 20, n) + 0.5).astype(np.float32)
        x[::32] = np.where(rng.integers(0, 2, n // 32) == 1, 127.0, -127.0)
        return x
    if kind == 3:  # zero blocks and tiny values
        x = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        x[: n // 3] = 0.0
        return x
    return (rng.standard_normal(n) * 300).astype(np.float32)


def test_activations(ours, ggml, rng):
    n = 4096
    for qt in (QT.Q8_0, QT.Q8_1, QT.Q8_K, QT.F16, QT.BF16):
        tr = ggml.ggml_get_type_traits_cpu(int(qt)).contents
        if not tr.from_float:
            check(False, f"ggml has no from_float for {qt.name}")
            continue
        from_float = FROM_FLOAT(tr.from_float)
        size = ours.tn_row_size(int(qt), n)
        for kind in range(5):
            x = act_data(rng, kind, n)
            a = np.zeros(size, dtype=np.uint8)
            b = np.zeros(size, dtype=np.uint8)
            ours.tn_quantize_row(int(qt), x.ctypes.data, a.ctypes.data, n)
            from_float(x.ctypes.data, b.ctypes.data, n)
            same = np.array_equal(a, b)
            check(same, f"{qt.name} data kind {kind}: {int((a != b).sum())} bytes differ from ggml's quantiser")


def weights(ours, rng, qt, n):
    """Weight row bytes: float types from random floats; quantised types from our quantiser
    or, for half the rows, random bytes with sane fp16 scales."""
    bs, ts = GGML_QUANT_SIZES[qt]
    if qt in (QT.F32, QT.F16, QT.BF16) or rng.integers(0, 2) == 0:
        x = rng.standard_normal(n).astype(np.float32)
        w = np.zeros(ours.tn_row_size(int(qt), n), dtype=np.uint8)
        ours.tn_quantize_weight_row(int(qt), x.ctypes.data, w.ctypes.data, n)
        return w
    fields = {QT.Q4_0: [0], QT.Q5_0: [0], QT.Q8_0: [0], QT.Q4_1: [0, 2], QT.Q5_1: [0, 2],
              QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q6_K: [208]}[qt]
    raw = rng.integers(0, 256, (n // bs, ts), dtype=np.uint8)
    if qt == QT.Q8_0:
        raw[raw == 0x80] = 0x81  # -128 is outside what any Q8_0 quantiser writes
    for off in fields:
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, n // bs).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def test_dots(ours, ggml, rng):
    types = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
             QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
    for qt in types:
        tr = ggml.ggml_get_type_traits_cpu(int(qt)).contents
        at = ours.tn_vec_dot_type(int(qt))
        check(tr.vec_dot_type == at, f"{qt.name}: activation type {at} vs ggml's {tr.vec_dot_type}")
        if not tr.vec_dot or tr.nrows != 1:
            check(False, f"{qt.name}: ggml vec_dot unusable (nrows {tr.nrows})")
            continue
        vec_dot = VEC_DOT(tr.vec_dot)
        bs = GGML_QUANT_SIZES[qt][0]
        worst = 0.0
        bad = 0
        for n in ((576, 1536, 4096) if bs == 32 else (1536, 4096) if bs == 256 else (576, 1000, 4099)):
            for rep in range(6):
                w = weights(ours, rng, qt, n)
                x = (rng.standard_normal(n) * (30 if rep == 5 else 1)).astype(np.float32)
                a = np.zeros(ours.tn_row_size(at, n), dtype=np.uint8)
                ours.tn_quantize_row(at, x.ctypes.data, a.ctypes.data, n)
                mine = ours.tn_vec_dot(int(qt), n, w.ctypes.data, a.ctypes.data)
                res = ctypes.c_float(0)
                vec_dot(n, ctypes.byref(res), 0, w.ctypes.data, 0, a.ctypes.data, 0, 1)
                wd = np.zeros(n, dtype=np.float32)
                ad = np.zeros(n, dtype=np.float32)
                ours.tn_dequant_row(int(qt), w.ctypes.data, wd.ctypes.data, n)
                ours.tn_dequant_row(at, a.ctypes.data, ad.ctypes.data, n)
                mag = float(np.sum(np.abs(wd.astype(np.float64) * ad)))
                # the "_1" and K-quant mins terms cancel against the quant terms; bound their size too
                blk = np.abs(wd.astype(np.float64)).reshape(-1, bs).max(axis=1) * np.abs(ad).reshape(-1, bs).sum(axis=1)
                mag += float(blk.sum()) if bs > 1 else 0.0
                err = abs(float(mine) - res.value) / max(mag, 1e-30)
                worst = max(worst, err)
                if not err <= 1e-5:
                    bad += 1
                    if bad == 1:
                        print(f"  {qt.name} n={n}: ours {mine!r} vs ggml {res.value!r} (mag {mag:g})")
        check(bad == 0, f"{qt.name}: {bad} dots differ from ggml's beyond 1e-5 of the magnitude")
        print(f"  {qt.name:5s} max |ours - ggml| / sum|w*a| = {worst:.2e}")


def main():
    ggml = load_ggml()
    if ggml is None:
        print("skip: llama_cpp's libggml-cpu.so not found")
        return 77
    if not os.path.exists(LIB):
        print(f"FAIL: {LIB} not built")
        print("0 passed, 1 failed")
        return 1
    ours = load_ours()
    print(f"our SIMD level: {ours.tn_simd_name(ours.tn_simd_level()).decode()}")
    rng = np.random.default_rng(77)
    test_activations(ours, ggml, rng)
    test_dots(ours, ggml, rng)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
