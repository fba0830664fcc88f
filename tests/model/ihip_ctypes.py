"""ctypes bindings to build/lib/libihip.so for the Python tests (model, tokenizer, sampling).

Only the opaque-pointer API is bound here; struct layouts mirror the C headers exactly:
cm_err (common/base/cm.h) and mdl_ctx_params (common/model/model.h).
"""
import ctypes as C
import os
import sys

SRC = os.environ.get("IHIP_SRC", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BIN = os.environ.get("IHIP_BIN", os.path.join(SRC, "build", "bin"))
LIB = os.path.join(os.path.dirname(BIN), "lib", "libihip.so")
MODEL = os.environ.get("IHIP_MODEL", os.path.join(SRC, "models", "SmolLM2-135M-Instruct-Q4_1.gguf"))


class CmErr(C.Structure):
    _fields_ = [("code", C.c_int), ("msg", C.c_char * 512)]


class CtxParams(C.Structure):
    _fields_ = [("n_ctx", C.c_int64), ("n_threads", C.c_int), ("kv_type", C.c_int), ("n_chunk", C.c_int64)]


def load():
    lib = C.CDLL(LIB)
    vp, i64, i32 = C.c_void_p, C.c_int64, C.c_int32
    lib.mdl_model_load.restype = vp
    lib.mdl_model_load.argtypes = [C.c_char_p, C.POINTER(CmErr)]
    lib.mdl_model_free.argtypes = [vp]
    lib.mdl_model_n_vocab.restype = i64
    lib.mdl_model_n_vocab.argtypes = [vp]
    lib.mdl_model_gguf.restype = vp
    lib.mdl_model_gguf.argtypes = [vp]
    lib.mdl_ctx_init.restype = vp
    lib.mdl_ctx_init.argtypes = [vp, C.POINTER(CtxParams), C.POINTER(CmErr)]
    lib.mdl_ctx_free.argtypes = [vp]
    lib.mdl_ctx_reset.argtypes = [vp]
    lib.mdl_prefill.restype = C.c_int
    lib.mdl_prefill.argtypes = [vp, C.POINTER(i32), i64, C.POINTER(C.c_float), vp, vp, C.POINTER(CmErr)]
    lib.mdl_decode.restype = C.c_int
    lib.mdl_decode.argtypes = [vp, i32, C.POINTER(C.c_float), C.POINTER(CmErr)]
    lib.mdl_ctx_logits.restype = C.POINTER(C.c_float)
    lib.mdl_ctx_logits.argtypes = [vp]
    if not hasattr(lib, "tok_vocab_init"):
        return lib
    lib.tok_vocab_init.restype = vp
    lib.tok_vocab_init.argtypes = [vp, C.POINTER(CmErr)]
    lib.tok_vocab_free.argtypes = [vp]
    lib.tok_encode.restype = i64
    lib.tok_encode.argtypes = [vp, C.c_char_p, C.c_size_t, C.c_bool, C.c_bool, C.POINTER(i32), i64, C.POINTER(CmErr)]
    return lib


class Engine:
    """One model + one context of our CPU engine."""

    def __init__(self, lib, path=MODEL, n_ctx=8192, threads=2, kv_type=1, chunk=0):
        import numpy as np
        self.np = np
        self.lib = lib
        err = CmErr()
        self.m = lib.mdl_model_load(path.encode(), C.byref(err))
        if not self.m:
            raise RuntimeError(err.msg.decode())
        self.n_vocab = lib.mdl_model_n_vocab(self.m)
        p = CtxParams(n_ctx=n_ctx, n_threads=threads, kv_type=kv_type, n_chunk=chunk)
        self.c = lib.mdl_ctx_init(self.m, C.byref(p), C.byref(err))
        if not self.c:
            raise RuntimeError(err.msg.decode())

    def close(self):
        self.lib.mdl_ctx_free(self.c)
        self.lib.mdl_model_free(self.m)

    def reset(self):
        self.lib.mdl_ctx_reset(self.c)

    def logits(self):
        return self.np.ctypeslib.as_array(self.lib.mdl_ctx_logits(self.c), shape=(self.n_vocab,)).copy()

    def prefill(self, ids):
        arr = (C.c_int32 * len(ids))(*ids)
        err = CmErr()
        rc = self.lib.mdl_prefill(self.c, arr, len(ids), None, None, None, C.byref(err))
        if rc != 0:
            raise RuntimeError(err.msg.decode())
        return self.logits()

    def decode(self, tok):
        err = CmErr()
        rc = self.lib.mdl_decode(self.c, tok, None, C.byref(err))
        if rc != 0:
            raise RuntimeError(err.msg.decode())
        return self.logits()


def skip_if_missing():
    missing = [p for p in (LIB, MODEL) if not os.path.exists(p)]
    if missing:
        print("skip: missing " + ", ".join(missing))
        print("0 passed, 0 failed, 1 skipped")
        sys.exit(77)
