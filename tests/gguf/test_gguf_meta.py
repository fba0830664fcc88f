#!/usr/bin/env python3
"""test_gguf_meta.py — our GGUF reader (libihip.so through ctypes) against gguf-py's GGUFReader.

Opens the real model ($IHIP_MODEL) with both and compares everything: the kv count, every key
(name, order, byte offset), every value type, every scalar (raw bytes and the typed getters),
every array's element type, length and every element (the 49152 token strings, the 48900
merges, the token types), every tensor's name, type, dims, absolute data offset, byte size and
data bytes; then the JSON of gguf_print_info against the same reference.

Exit 0 pass, 1 fail, 77 skip (model or gguf package absent). Last line: "N passed, N failed".
"""
import ctypes
import json
import os
import sys
import tempfile

PASS = 0
FAIL = 0


def check(cond, what):
    global PASS, FAIL
    if cond:
        PASS += 1
    else:
        FAIL += 1
        print(f"FAIL: {what}", file=sys.stderr)
    return cond


# ---- ctypes mirror of common/gguf/gguf.h ---------------------------------------------------

class GgufStr(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p),   # const char *, not NUL-terminated
                ("len", ctypes.c_uint64)]


class GgufKv(ctypes.Structure):
    _fields_ = [("key", GgufStr),
                ("type", ctypes.c_uint32),
                ("arr_type", ctypes.c_uint32),
                ("arr_n", ctypes.c_uint64),
                ("data", ctypes.c_void_p),
                ("arr_strs", ctypes.POINTER(GgufStr))]


GGUF_MAX_DIMS = 4


class GgufTensor(ctypes.Structure):
    _fields_ = [("name", GgufStr),
                ("n_dims", ctypes.c_uint32),
                ("ne", ctypes.c_uint64 * GGUF_MAX_DIMS),
                ("type", ctypes.c_uint32),
                ("offset", ctypes.c_uint64),
                ("nbytes", ctypes.c_uint64),
                ("data", ctypes.c_void_p)]


class CmErr(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("msg", ctypes.c_char * 512)]


def load_lib(path):
    lib = ctypes.CDLL(path)
    P = ctypes.c_void_p
    sig = {
        "gguf_open": (P, [ctypes.c_char_p, ctypes.POINTER(CmErr)]),
        "gguf_close": (None, [P]),
        "gguf_version": (ctypes.c_uint32, [P]),
        "gguf_alignment": (ctypes.c_uint64, [P]),
        "gguf_file_size": (ctypes.c_uint64, [P]),
        "gguf_data_offset": (ctypes.c_uint64, [P]),
        "gguf_n_kv": (ctypes.c_int64, [P]),
        "gguf_kv_at": (ctypes.POINTER(GgufKv), [P, ctypes.c_int64]),
        "gguf_find_kv": (ctypes.POINTER(GgufKv), [P, ctypes.c_char_p]),
        "gguf_vtype_name": (ctypes.c_char_p, [ctypes.c_uint32]),
        "gguf_get_u64": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64),
                                        ctypes.POINTER(CmErr)]),
        "gguf_get_i64": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64),
                                        ctypes.POINTER(CmErr)]),
        "gguf_get_f64": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_double),
                                        ctypes.POINTER(CmErr)]),
        "gguf_get_bool": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_bool),
                                         ctypes.POINTER(CmErr)]),
        "gguf_get_str": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(GgufStr),
                                        ctypes.POINTER(CmErr)]),
        "gguf_get_arr": (ctypes.c_int, [P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32),
                                        ctypes.POINTER(ctypes.c_uint64),
                                        ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.POINTER(GgufStr)),
                                        ctypes.POINTER(CmErr)]),
        "gguf_arr_f64": (ctypes.c_double, [ctypes.POINTER(GgufKv), ctypes.c_uint64]),
        "gguf_arr_i64": (ctypes.c_int64, [ctypes.POINTER(GgufKv), ctypes.c_uint64]),
        "gguf_n_tensors": (ctypes.c_int64, [P]),
        "gguf_tensor_at": (ctypes.POINTER(GgufTensor), [P, ctypes.c_int64]),
        "gguf_find_tensor": (ctypes.POINTER(GgufTensor), [P, ctypes.c_char_p]),
        "gguf_print_info": (ctypes.c_int, [P, P, ctypes.c_bool, ctypes.c_bool]),
        "tn_type_name": (ctypes.c_char_p, [ctypes.c_int]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    return lib


def sbytes(s):
    return ctypes.string_at(s.ptr, s.len) if s.len else b""


def addr(p):
    return ctypes.cast(p, ctypes.c_void_p).value


def main():
    model = os.environ.get("IHIP_MODEL", "")
    bindir = os.environ.get("IHIP_BIN", "")
    if not model or not os.path.exists(model):
        print(f"skip: model {model!r} not found")
        print("0 passed, 0 failed")
        return 77
    try:
        import numpy as np
        from gguf import GGUFReader, GGUFValueType, GGMLQuantizationType
    except ImportError as e:
        print(f"skip: {e}")
        print("0 passed, 0 failed")
        return 77
    libpath = os.path.join(bindir, "..", "lib", "libihip.so")
    if not check(os.path.exists(libpath), f"{libpath} exists"):
        print(f"{PASS} passed, {FAIL} failed")
        return 1
    lib = load_lib(libpath)

    ref = GGUFReader(model)
    err = CmErr()
    f = lib.gguf_open(model.encode(), ctypes.byref(err))
    if not check(f, f"gguf_open: {err.msg.decode(errors='replace')}"):
        print(f"{PASS} passed, {FAIL} failed")
        return 1

    # ---- header ----
    ref_kv = [(k, fld) for k, fld in ref.fields.items() if not k.startswith("GGUF.")]
    n_kv = lib.gguf_n_kv(f)
    check(n_kv == len(ref_kv), f"kv count {n_kv} vs {len(ref_kv)}")
    check(n_kv == int(ref.fields["GGUF.kv_count"].contents()), "kv count vs header field")
    check(lib.gguf_version(f) == int(ref.fields["GGUF.version"].contents()), "version")
    check(lib.gguf_alignment(f) == ref.alignment, f"alignment {lib.gguf_alignment(f)}")
    check(lib.gguf_data_offset(f) == ref.data_offset,
          f"data offset {lib.gguf_data_offset(f)} vs {ref.data_offset}")
    check(lib.gguf_file_size(f) == os.path.getsize(model), "file size")

    # The mapping's base: the first key's bytes lie 8 bytes after its field's offset.
    base = lib.gguf_kv_at(f, 0).contents.key.ptr - (ref_kv[0][1].offset + 8)

    vt_size = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2,
               GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4,
               GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1, GGUFValueType.UINT64: 8,
               GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
    np_type = {GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8,
               GGUFValueType.UINT16: np.uint16, GGUFValueType.INT16: np.int16,
               GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
               GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.uint8,
               GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
               GGUFValueType.FLOAT64: np.float64}
    int_types = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16,
                 GGUFValueType.INT16, GGUFValueType.UINT32, GGUFValueType.INT32,
                 GGUFValueType.UINT64, GGUFValueType.INT64}
    float_types = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}

    n_elems_checked = 0
    for i, (key, fld) in enumerate(ref_kv[:max(n_kv, 0)]):
        kvp = lib.gguf_kv_at(f, i)
        kv = kvp.contents
        k = key.encode()
        check(sbytes(kv.key) == k, f"key #{i}: {sbytes(kv.key)!r} vs {key!r}")
        check(kv.key.ptr - base == fld.offset + 8, f"{key}: key offset")
        check(addr(lib.gguf_find_kv(f, k)) == addr(kvp), f"{key}: find_kv")
        check(lib.gguf_vtype_name(kv.type).decode() == fld.types[0].name.lower(),
              f"{key}: type name {lib.gguf_vtype_name(kv.type)} vs {fld.types[0].name}")
        t0 = fld.types[0]
        if not check(kv.type == int(t0), f"{key}: type {kv.type} vs {int(t0)}"):
            continue
        err = CmErr()
        if t0 == GGUFValueType.STRING:
            want = fld.parts[-1].tobytes()
            s = GgufStr()
            check(lib.gguf_get_str(f, k, ctypes.byref(s), ctypes.byref(err)) == 0, f"{key}: get_str")
            check(sbytes(s) == want, f"{key}: string value")
            check(sbytes(kv.arr_strs[0]) == want, f"{key}: string via arr_strs")
            check(kv.data - base == fld.offset + len(k) + 8 + 4 + 8, f"{key}: string offset")
        elif t0 != GGUFValueType.ARRAY:
            part = fld.parts[-1]
            check(ctypes.string_at(kv.data, vt_size[t0]) == part.tobytes(), f"{key}: raw bytes")
            check(kv.data - base == fld.offset + len(k) + 8 + 4, f"{key}: value offset")
            want = fld.contents()
            if t0 in int_types:
                if t0 == GGUFValueType.UINT64:
                    v = ctypes.c_uint64()
                    rc = lib.gguf_get_u64(f, k, ctypes.byref(v), ctypes.byref(err))
                else:
                    v = ctypes.c_int64()
                    rc = lib.gguf_get_i64(f, k, ctypes.byref(v), ctypes.byref(err))
                check(rc == 0 and v.value == want, f"{key}: {v.value} vs {want}")
            elif t0 in float_types:
                v = ctypes.c_double()
                rc = lib.gguf_get_f64(f, k, ctypes.byref(v), ctypes.byref(err))
                check(rc == 0 and v.value == float(part[0]), f"{key}: {v.value} vs {want}")
            elif t0 == GGUFValueType.BOOL:
                v = ctypes.c_bool()
                rc = lib.gguf_get_bool(f, k, ctypes.byref(v), ctypes.byref(err))
                check(rc == 0 and v.value == bool(want), f"{key}: {v.value} vs {want}")
        else:
            et = fld.types[-1] if len(fld.types) > 1 else None
            n_ref = len(fld.data)
            etype = ctypes.c_uint32()
            n = ctypes.c_uint64()
            data = ctypes.c_void_p()
            strs = ctypes.POINTER(GgufStr)()
            rc = lib.gguf_get_arr(f, k, ctypes.byref(etype), ctypes.byref(n), ctypes.byref(data),
                                  ctypes.byref(strs), ctypes.byref(err))
            check(rc == 0, f"{key}: get_arr")
            check(n.value == n_ref == kv.arr_n, f"{key}: count {n.value} vs {n_ref}")
            if et is not None:
                check(etype.value == int(et) == kv.arr_type, f"{key}: elem type {etype.value} vs {et}")
            if n_ref == 0 or et is None:
                continue
            check(kv.data - base == fld.offset + len(k) + 8 + 4 + 4 + 8, f"{key}: array offset")
            if et == GGUFValueType.STRING:
                bad = 0
                for j, idx in enumerate(fld.data):
                    if sbytes(strs[j]) != fld.parts[idx].tobytes():
                        if bad < 3:
                            print(f"  {key}[{j}]: {sbytes(strs[j])!r} vs "
                                  f"{fld.parts[idx].tobytes()!r}", file=sys.stderr)
                        bad += 1
                    n_elems_checked += 1
                check(bad == 0, f"{key}: {bad} of {n_ref} strings differ")
            else:
                want = np.concatenate([fld.parts[idx] for idx in fld.data])
                raw = ctypes.string_at(data.value, n_ref * vt_size[et])
                got = np.frombuffer(raw, dtype=np_type[et])
                check(raw == want.tobytes(), f"{key}: raw array bytes")
                bad_i = bad_f = 0
                for j in range(n_ref):
                    w = want[j]
                    if et in float_types:
                        bad_f += lib.gguf_arr_f64(kvp, j) != float(w)
                    else:
                        wi = int(w)
                        if et == GGUFValueType.UINT64 and wi > 2**63 - 1:
                            wi = 2**63 - 1
                        bad_i += lib.gguf_arr_i64(kvp, j) != wi
                        bad_f += lib.gguf_arr_f64(kvp, j) != float(int(w))
                    n_elems_checked += 1
                check(bad_i == 0 and bad_f == 0 and np.array_equal(got, want),
                      f"{key}: {bad_i}/{bad_f} elements differ")
    print(f"kv: {n_kv} keys, {n_elems_checked} array elements compared")

    # ---- tensors ----
    n_t = lib.gguf_n_tensors(f)
    check(n_t == len(ref.tensors), f"tensor count {n_t} vs {len(ref.tensors)}")
    bytes_checked = 0
    for i, rt in enumerate(ref.tensors[:max(n_t, 0)]):
        tp = lib.gguf_tensor_at(f, i)
        t = tp.contents
        name = rt.name
        check(sbytes(t.name) == name.encode(), f"tensor #{i}: name {sbytes(t.name)!r} vs {name!r}")
        check(addr(lib.gguf_find_tensor(f, name.encode())) == addr(tp), f"{name}: find_tensor")
        check(t.type == int(rt.tensor_type), f"{name}: type {t.type} vs {int(rt.tensor_type)}")
        dims = [int(d) for d in rt.shape]
        check(t.n_dims == len(dims), f"{name}: n_dims {t.n_dims} vs {len(dims)}")
        check(list(t.ne[:t.n_dims]) == dims, f"{name}: dims {list(t.ne)} vs {dims}")
        check(all(x == 1 for x in t.ne[t.n_dims:]), f"{name}: unused dims are 1")
        check(t.nbytes == rt.n_bytes, f"{name}: nbytes {t.nbytes} vs {rt.n_bytes}")
        check(t.data - base == rt.data_offset, f"{name}: data at {t.data - base} vs {rt.data_offset}")
        check(lib.gguf_data_offset(f) + t.offset == rt.data_offset, f"{name}: relative offset")
        same = ctypes.string_at(t.data, t.nbytes) == rt.data.tobytes()
        check(same, f"{name}: data bytes")
        bytes_checked += t.nbytes
    check(not lib.gguf_find_tensor(f, b"no.such.tensor"), "absent tensor")
    check(not lib.gguf_find_kv(f, b"no.such.key"), "absent key")
    print(f"tensors: {n_t} compared, {bytes_checked} data bytes")

    # ---- gguf_print_info: the JSON against the reference, the text runs ----
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.TemporaryDirectory() as td:
        outs = {}
        for mode in (True, False):
            p = os.path.join(td, f"out-{mode}")
            fp = libc.fopen(p.encode(), b"w")
            rc = lib.gguf_print_info(f, fp, mode, True)
            libc.fclose(fp)
            check(rc == 0, f"gguf_print_info(json={mode}) = {rc}")
            with open(p, "rb") as fh:
                outs[mode] = fh.read()
    text = outs[False].decode("utf-8", errors="replace")
    check("token_embd.weight" in text and "Q8_0" in text and "49152" in text, "text dump content")
    try:
        js = json.loads(outs[True])
    except ValueError as e:
        check(False, f"JSON dump parses: {e}")
        js = None
    if js is not None:
        check(js["version"] == lib.gguf_version(f) and js["alignment"] == ref.alignment
              and js["data_offset"] == ref.data_offset, "JSON header")
        check(list(js["kv"].keys()) == [k for k, _ in ref_kv], "JSON keys")
        for key, fld in ref_kv:
            v = js["kv"].get(key)
            t0 = fld.types[0]
            if t0 == GGUFValueType.ARRAY:
                et = fld.types[-1]
                want_head = fld.contents(slice(0, 8)) if fld.data else []
                if et == GGUFValueType.FLOAT32:
                    want_head = [float(np.float32(x)) for x in want_head]
                ok = (isinstance(v, dict) and v["type"] == et.name.lower()
                      and v["count"] == len(fld.data) and v["head"] == want_head)
                check(ok, f"JSON {key}: {str(v)[:200]}")
            elif t0 == GGUFValueType.FLOAT32:
                check(np.float32(v) == fld.parts[-1][0], f"JSON {key}: {v}")
            elif t0 == GGUFValueType.STRING:
                check(v == fld.contents(), f"JSON {key}: {v!r} vs {fld.contents()!r}")
            else:
                check(v == fld.contents(), f"JSON {key}: {v!r} vs {fld.contents()!r}")
        jt = js.get("tensors", [])
        check(len(jt) == len(ref.tensors), "JSON tensor count")
        for jte, rt in zip(jt, ref.tensors):
            ok = (jte["name"] == rt.name and jte["type"] == rt.tensor_type.name
                  and jte["dims"] == [int(d) for d in rt.shape]
                  and ref.data_offset + jte["offset"] == rt.data_offset
                  and jte["nbytes"] == rt.n_bytes)
            check(ok, f"JSON tensor {jte} vs {rt.name}")

    # ---- a few getters as the model loader will use them ----
    v = ctypes.c_uint64()
    check(lib.gguf_get_u64(f, b"llama.block_count", ctypes.byref(v), ctypes.byref(err)) == 0
          and v.value == ref.fields["llama.block_count"].contents(), "llama.block_count")
    check(lib.gguf_get_u64(f, b"no.such.key", ctypes.byref(v), ctypes.byref(err)) < 0,
          "get of an absent key fails")

    lib.gguf_close(f)
    print(f"{PASS} passed, {FAIL} failed")
    return 0 if FAIL == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
