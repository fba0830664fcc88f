#!/usr/bin/env python3
"""test_tokenizer.py — our tokenizer (libihip.so through ctypes) against llama.cpp.

The reference is llama-cpp-python (llama.cpp compiled into the venv) loading the same GGUF with
vocab_only=True. Checked:
  1. token ids of tok_encode vs Llama.tokenize on the corpus (tests/tokenizer/corpus/*.txt),
     hand-written edge cases and 300 seeded random strings mixing scripts, emoji, digits,
     white space, contractions, control characters, unassigned code points and special-token
     text; every string with add_bos and parse_special each false and true;
  2. decoding: tok_piece for every token and tok_decode of every encoded string vs
     llama_token_to_piece (special false and true), and decode(encode(x)) == x;
  3. vocabulary facts: n_vocab, BOS/EOS, add_bos, token attributes, end-of-generation tokens;
  4. the other pre-tokenizers (gpt-2, llama-bpe, qwen2, default, falcon, starcoder) and a
     user-defined token, on vocab-only copies of the model's vocabulary with the metadata
     changed, and a SentencePiece ("llama") vocabulary built from it;
  5. chat templates: tok_chat_render vs Jinja2 rendering of the model's own template, of the
     Llama-3 template and of a Mistral template; tok_chat_detect on each.
Exit 0 pass, 1 fail, 77 skip (venv or model missing). Last line: "N passed, N failed".
"""
import ctypes
import glob
import os
import random
import sys
import tempfile
import time
import unicodedata

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("IHIP_SRC", os.path.dirname(os.path.dirname(HERE)))
MODEL = os.environ.get("IHIP_MODEL", os.path.join(SRC, "models", "SmolLM2-135M-Instruct-Q4_1.gguf"))
BIN = os.environ.get("IHIP_BIN", os.path.join(SRC, "build", "bin"))
LIB = os.path.join(os.path.dirname(BIN), "lib", "libihip.so")

try:
    import gguf
    import jinja2
    import llama_cpp
except ImportError as e:  # the venv is not there
    print("skip: %s" % e)
    print("0 passed, 0 failed")
    sys.exit(SKIP)
if not os.path.exists(MODEL):
    print("skip: no model at %s" % MODEL)
    print("0 passed, 0 failed")
    sys.exit(SKIP)

if not os.path.exists(LIB):
    print("FAIL: %s is not built" % LIB)
    print("0 passed, 1 failed")
    sys.exit(1)

passed = 0
failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        if failed <= 40:
            print("FAIL: %s" % what)
    return ok


# ---- our library -----------------------------------------------------------------------------

class Err(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("msg", ctypes.c_char * 512)]


class ChatMsg(ctypes.Structure):
    _fields_ = [("role", ctypes.c_char_p), ("content", ctypes.c_char_p)]


lib = ctypes.CDLL(LIB)
libc = ctypes.CDLL(None)
libc.free.argtypes = [ctypes.c_void_p]
P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
ERRP = ctypes.POINTER(Err)
for name, res, args in [
    ("gguf_open", P, [ctypes.c_char_p, ERRP]),
    ("gguf_close", None, [P]),
    ("tok_vocab_init", P, [P, ERRP]),
    ("tok_vocab_free", None, [P]),
    ("tok_n_vocab", I32, [P]),
    ("tok_bos", I32, [P]),
    ("tok_eos", I32, [P]),
    ("tok_add_bos", ctypes.c_bool, [P]),
    ("tok_is_eog", ctypes.c_bool, [P, I32]),
    ("tok_attr", ctypes.c_int, [P, I32]),
    ("tok_text", ctypes.c_char_p, [P, I32]),
    ("tok_encode", I64, [P, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_bool, ctypes.c_bool,
                         ctypes.POINTER(I32), I64, ERRP]),
    ("tok_piece", I64, [P, I32, ctypes.c_bool, ctypes.c_char_p, I64]),
    ("tok_decode", I64, [P, ctypes.POINTER(I32), I64, ctypes.c_bool, ctypes.c_char_p, I64]),
    ("tok_chat_detect", ctypes.c_int, [P, ERRP]),
    ("tok_chat_render", P, [P, ctypes.c_int, ctypes.POINTER(ChatMsg), ctypes.c_int,
                            ctypes.c_bool, ERRP]),
]:
    fn = getattr(lib, name)
    fn.restype = res
    fn.argtypes = args

CHATML, LLAMA3, MISTRAL = 1, 2, 3
EUNSUPPORTED = 5002


class Ours:
    def __init__(self, path):
        e = Err()
        self.f = lib.gguf_open(path.encode(), ctypes.byref(e))
        if not self.f:
            raise RuntimeError("gguf_open: %s" % e.msg.decode())
        self.v = lib.tok_vocab_init(self.f, ctypes.byref(e))
        if not self.v:
            raise RuntimeError("tok_vocab_init: %s" % e.msg.decode())

    def close(self):
        lib.tok_vocab_free(self.v)
        lib.gguf_close(self.f)

    def encode(self, b, add_bos, special):
        e = Err()
        n = lib.tok_encode(self.v, b, len(b), add_bos, special, None, 0, ctypes.byref(e))
        if n < 0:
            return ("error", n, e.msg.decode())
        buf = (I32 * max(n, 1))()
        m = lib.tok_encode(self.v, b, len(b), add_bos, special, buf, n, ctypes.byref(e))
        assert m == n
        return list(buf[:n])

    def piece(self, tid, special):
        n = lib.tok_piece(self.v, tid, special, None, 0)
        buf = ctypes.create_string_buffer(max(n, 1))
        lib.tok_piece(self.v, tid, special, buf, n)
        return buf.raw[:n]

    def decode(self, ids, special):
        arr = (I32 * max(len(ids), 1))(*ids)
        n = lib.tok_decode(self.v, arr, len(ids), special, None, 0)
        buf = ctypes.create_string_buffer(max(n, 1))
        m = lib.tok_decode(self.v, arr, len(ids), special, buf, n)
        assert m == n
        return buf.raw[:n]

    def chat(self, kind, msgs, add_gen):
        arr = (ChatMsg * max(len(msgs), 1))(*[ChatMsg(m["role"].encode(), m["content"].encode())
                                               for m in msgs])
        e = Err()
        p = lib.tok_chat_render(self.f, kind, arr, len(msgs), add_gen, ctypes.byref(e))
        if not p:
            return ("error", e.msg.decode())
        s = ctypes.string_at(p).decode()
        libc.free(p)
        return s


# ---- the reference ---------------------------------------------------------------------------

class Ref:
    def __init__(self, path):
        self.m = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.m.model)

    def encode(self, b, add_bos, special):
        return self.m.tokenize(b, add_bos=add_bos, special=special)

    def piece(self, tid, special):
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, tid, buf, 256, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, tid, buf, -n, 0, special)
        return buf.raw[:n]


# llama.cpp's token attribute bits for our enum tok_attr values
ATTR_BITS = {0: 0, 1: 4, 2: 1, 3: 8, 4: 16, 5: 2, 6: 32}


# ---- the strings -----------------------------------------------------------------------------

def corpus():
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "corpus", "*.txt"))):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        out.append(text)  # the whole file as one string too
        out.extend(r for r in text.split("\n=====\n") if r)
    # decomposed forms of the accented / scripted records
    out.extend(unicodedata.normalize("NFD", s) for s in list(out) if s != unicodedata.normalize("NFD", s))
    return out


EDGE = [
    "", " ", "  ", "   ", "\n", "\r\n", "\t", "\r", "a", "A", "1", "!", "'", "''", "'s",
    "don't", "Don't", "DON'T", "I'LL", "I'll", "we're", "we’re", "you've", "she'd", "I'm", "it's",
    "rock 'n' roll", "'tis", "y'all", "o'clock", "l'homme", "'''quoted'''",
    "  leading spaces", "trailing spaces   ", "\ttabs\tand\ttabs\t", "a\r\nb\r\n\r\nc",
    "\n\n\n", " \n \n ", "line1\nline2\n", "mixed \t \n  \r\n spaces", "a  b   c    d",
    "x" * 5000, " " * 1000, "\n" * 300, "1" * 500, "ab" * 2000, "😀" * 200, "é" * 300,
    "3.14159", "1,000,000", "+1-555-123-4567", "12345678901234567890", "0.000001", "1e-10",
    "a\x00b", "\x00", "\x01\x02\x1b[31mred\x1b[0m", "\x7f\x1c\x1d\x1e\x1f", "\u00a0\u2009\u3000",
    "\u0085next line", "a\u2028b\u2029c", "\ufeffBOM", "zero\u200bwidth\u200djoiner",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|><|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|", "|im_start|>", "<<|im_start|>>", "<|im_start|>|im_end|>", "<|im_start|x",
    "text<|im_end|>text", " <|im_end|> ", "<|im_end|><|im_end|><|im_end|>",
    "<reponame>repo<file_sep>a.py<filename>x<gh_stars>10<jupyter_text>t<empty_output>",
    "<|endoftext|><|im_start|>", "<repo_name><reponame>",
]

EMOJI = ["😀", "🍕", "👨‍👩‍👧‍👦", "👩‍❤️‍👨", "👩🏽‍💻", "🏳️‍🌈", "👋🏻", "👋🏿", "👍🏽", "🇺🇸", "🇯🇵",
         "1️⃣", "#️⃣", "❤️", "✨", "🧑‍🚀", "🫠", "🦀", "☕", "⚡"]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|", "im_end|>",
            "<reponame>", "<jupyter_text>", "<|im_start|>user\n", "<|im_end|>\n"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "\r", "\u00a0", "\u3000",
          "\u2009", "\u0085", "\u1680", "\u202f", "\x0b", "\x0c", "\x1c", "\x1f", "\u2028"]
UNUM = ["٣", "३", "３", "²", "½", "Ⅻ", "⑤", "𝟙", "〇", "৩", "፲"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "’re", "n't",
                "'", "''"]


def fuzz(n, seed):
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    punct = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"

    def rand_cp(lo, hi):
        return chr(rng.randint(lo, hi))

    def any_cp():
        while True:
            c = rng.randint(0x80, 0x10FFFF)
            if not 0xD800 <= c < 0xE000:
                return chr(c)

    pools = [
        lambda: "".join(rng.choice(letters) for _ in range(rng.randint(1, 8))),
        lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12))),
        lambda: "".join(rng.choice(punct) for _ in range(rng.randint(1, 4))),
        lambda: rng.choice(SPACES),
        lambda: rng.choice(SPACES) * rng.randint(1, 4),
        lambda: rng.choice(CONTRACTIONS),
        lambda: "".join(rand_cp(0x4E00, 0x9FFF) for _ in range(rng.randint(1, 6))),
        lambda: "".join(rand_cp(0x3040, 0x30FF) for _ in range(rng.randint(1, 6))),
        lambda: "".join(rand_cp(0xAC00, 0xD7A3) for _ in range(rng.randint(1, 4))),
        lambda: "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 3))),
        lambda: rng.choice(letters) + "".join(rand_cp(0x300, 0x36F) for _ in range(rng.randint(1, 3))),
        lambda: "".join(rand_cp(0x600, 0x6FF) for _ in range(rng.randint(1, 6))),
        lambda: "".join(rand_cp(0x900, 0x97F) for _ in range(rng.randint(1, 6))),
        lambda: "".join(rand_cp(0x590, 0x5FF) for _ in range(rng.randint(1, 6))),
        lambda: "".join(rand_cp(0x370, 0x4FF) for _ in range(rng.randint(1, 6))),
        lambda: rng.choice(UNUM),
        lambda: rng.choice(SPECIALS),
        lambda: any_cp(),
        lambda: chr(rng.choice(list(range(0, 32)) + [0x7F])),
    ]
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(pools)() for _ in range(rng.randint(1, 14))))
    return out


# ---- checks ----------------------------------------------------------------------------------

def compare_ids(ours, ref, strings, label, flags=((False, False), (False, True), (True, False), (True, True))):
    n = 0
    for s in strings:
        b = s.encode("utf-8")
        for add_bos, special in flags:
            a = ours.encode(b, add_bos, special)
            r = ref.encode(b, add_bos, special)
            n += 1
            check(a == r, "%s ids differ for %r (add_bos=%s special=%s):\n  ours %s\n  ref  %s"
                  % (label, s[:200], add_bos, special, a if len(str(a)) < 600 else str(a)[:600],
                     r if len(str(r)) < 600 else str(r)[:600]))
    return n


def representable_bytes(ours):
    """Bytes that have a single-byte token; a byte-level vocabulary missing some (this one
    lacks e.g. 0x04 and 0xF1) drops them, as llama.cpp does, so only the others round-trip."""
    nv = lib.tok_n_vocab(ours.v)
    return {p[0] for p in (ours.piece(i, True) for i in range(nv)) if len(p) == 1}


def compare_decode(ours, ref, strings, label, roundtrip=True):
    n = 0
    rep = representable_bytes(ours) if roundtrip else set()
    for s in strings:
        b = s.encode("utf-8")
        ids = ours.encode(b, True, True)
        if isinstance(ids, tuple):
            check(False, "%s encode failed for %r: %s" % (label, s[:100], ids))
            continue
        for special in (False, True):
            want = b"".join(ref.piece(t, special) for t in ids)
            n += 1
            check(ours.decode(ids, special) == want,
                  "%s decode differs for %r (special=%s)" % (label, s[:100], special))
        if roundtrip and all(c in rep for c in b):  # byte-level BPE gives the string back
            plain = ours.encode(b, False, False)
            n += 1
            check(ours.decode(plain, True) == b, "%s round trip failed for %r" % (label, s[:100]))
    return n


def probe(c):
    """One code point in the contexts where its class decides the split."""
    return "a" + c + "a " + c + " " + c + "!" + c + "1" + c + "'s" + c + "  " + c + "\n" + c + c + "."


def sweep(ours, ref, label, step):
    """Every step-th code point (all but surrogates): its class must match llama.cpp's."""
    cps = [c for c in range(0, 0x110000, step) if not 0xD800 <= c < 0xE000]
    bad, n = [], 0
    for i in range(0, len(cps), 512):
        chunk = cps[i:i + 512]
        b = "".join(probe(chr(c)) for c in chunk).encode()
        n += 1
        if ours.encode(b, False, False) == ref.encode(b, False, False):
            check(True, "")
            continue
        for c in chunk:
            b = probe(chr(c)).encode()
            if ours.encode(b, False, False) != ref.encode(b, False, False):
                bad.append(c)
        check(False, "%s: code points tokenized differently: %s" % (label, [hex(c) for c in bad[-20:]]))
    return len(cps), n


def compare_vocab(ours, ref, label):
    v = ref.vocab
    nv = lib.tok_n_vocab(ours.v)
    check(nv == llama_cpp.llama_vocab_n_tokens(v), "%s n_vocab %d" % (label, nv))
    check(lib.tok_bos(ours.v) == llama_cpp.llama_vocab_bos(v), "%s bos" % label)
    check(lib.tok_eos(ours.v) == llama_cpp.llama_vocab_eos(v), "%s eos" % label)
    check(lib.tok_add_bos(ours.v) == llama_cpp.llama_vocab_get_add_bos(v), "%s add_bos" % label)
    bad_attr = [i for i in range(nv)
                if ATTR_BITS.get(lib.tok_attr(ours.v, i), -1) != (llama_cpp.llama_vocab_get_attr(v, i) & 0x3F)]
    check(not bad_attr, "%s token attributes differ for ids %s" % (label, bad_attr[:20]))
    eog_o = [i for i in range(nv) if lib.tok_is_eog(ours.v, i)]
    eog_r = [i for i in range(nv) if llama_cpp.llama_vocab_is_eog(v, i)]
    check(eog_o == eog_r, "%s EOG tokens: ours %s ref %s" % (label, eog_o, eog_r))
    bad_piece = [(i, sp) for i in range(nv) for sp in (False, True)
                 if ours.piece(i, sp) != ref.piece(i, sp)]
    check(not bad_piece, "%s pieces differ for %s" % (label, bad_piece[:20]))
    return 5 + 3 * nv


# ---- synthetic vocab-only files --------------------------------------------------------------

def read_fields(path):
    r = gguf.GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        t = f.types[0]
        out[k] = (f.contents(), t, f.types[-1] if t == gguf.GGUFValueType.ARRAY else None)
    return out


def write_gguf(path, fields):
    w = gguf.GGUFWriter(path, arch="llama")
    for k, (val, t, st) in fields.items():
        w.add_key_value(k, val, t, st)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def spm_fields(base):
    """A SentencePiece vocabulary made from the model's: the BPE tokens decoded to text with
    spaces as '▁' (scores by rank), byte tokens, <unk>/<s>/</s>, a user-defined token and a
    control token."""
    toks = base["tokenizer.ggml.tokens"][0]
    b2u = {}
    n = 0
    for b in range(256):
        printable = 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or b >= 0xAE
        b2u[chr(b) if printable else chr(256 + n)] = b
        n += 0 if printable else 1
    words, seen = [], set()
    for t in toks[17:]:
        try:
            raw = bytes(b2u[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        w = raw.replace(" ", "\u2581")
        if w and w not in seen:
            seen.add(w)
            words.append(w)
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += ["<tool>", "<|ctl|>"]
    types += [4, 3]
    scores = [0.0] * len(tokens)
    for i, w in enumerate(words[:20000]):
        tokens.append(w)
        types.append(1)
        scores.append(-float(i))
    A, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType
    f = {k: v for k, v in base.items() if not k.startswith("tokenizer.")}
    f["tokenizer.ggml.model"] = ("llama", S.STRING, None)
    f["tokenizer.ggml.tokens"] = (tokens, A, S.STRING)
    f["tokenizer.ggml.scores"] = (scores, A, S.FLOAT32)
    f["tokenizer.ggml.token_type"] = (types, A, S.INT32)
    f["tokenizer.ggml.bos_token_id"] = (1, S.UINT32, None)
    f["tokenizer.ggml.eos_token_id"] = (2, S.UINT32, None)
    f["tokenizer.ggml.unknown_token_id"] = (0, S.UINT32, None)
    return f


# ---- chat ------------------------------------------------------------------------------------

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Mistral-7B-Instruct style, with a system message put before the next user message
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.sys = message['content'] %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% if ns.sys %}"
    "{{ ns.sys + '\\n\\n' }}{% set ns.sys = '' %}{% endif %}{{ message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

CONVERSATIONS = [
    [],
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about caf\u00e9s \U0001F600."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "  spaced\n\n"},
     {"role": "assistant", "content": "\tok  "}, {"role": "user", "content": "\u3000\u00a0x\u2028"}],
    [{"role": "user", "content": "multi\nline\r\ntext with <|im_end|> inside"}],
]


def jinja(template, msgs, add_gen, **kw):
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)

    def raise_exception(m):
        raise jinja2.exceptions.TemplateError(m)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=msgs, add_generation_prompt=add_gen, **kw)


def check_chat(ours, template_text):
    n = 0
    kind = lib.tok_chat_detect(ours.f, None)
    check(kind == CHATML, "model template detected as %d, want ChatML" % kind)
    cases = [(CHATML, template_text, {}),
             (LLAMA3, LLAMA3_TEMPLATE, {"bos_token": ""}),
             (MISTRAL, MISTRAL_TEMPLATE, {"bos_token": "", "eos_token": "</s>"})]
    for kind, tmpl, kw in cases:
        for msgs in CONVERSATIONS:
            if kind == MISTRAL and msgs and msgs[-1]["role"] == "assistant":
                continue
            for add_gen in (False, True):
                if kind == MISTRAL and add_gen:
                    continue  # Mistral has no generation prompt
                want = jinja(tmpl, msgs, add_gen, **kw)
                got = ours.chat(kind, msgs, add_gen)
                n += 1
                check(got == want, "chat kind %d differs for %s add_gen=%s:\n  ours %r\n  jinja %r"
                      % (kind, msgs, add_gen, got, want))
    # also through llama-cpp-python's own Jinja2 chat formatter, for the model's template
    fmt = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template=template_text, eos_token="<|im_end|>",
                                                          bos_token="<|im_start|>")
    for msgs in CONVERSATIONS[1:]:
        want = fmt(messages=msgs).prompt
        n += 1
        check(ours.chat(CHATML, msgs, True) == want, "chat differs from Jinja2ChatFormatter for %s" % msgs)
    return n


def check_detect(tmpdir):
    n = 0
    for name, tmpl, want in [("chatml", "{% for m in messages %}<|im_start|>{{ m }}{% endfor %}", CHATML),
                             ("llama3", LLAMA3_TEMPLATE, LLAMA3), ("mistral", MISTRAL_TEMPLATE, MISTRAL),
                             ("other", "{{ messages }}", -EUNSUPPORTED), ("none", None, -EUNSUPPORTED)]:
        path = os.path.join(tmpdir, "tmpl-%s.gguf" % name)
        f = {} if tmpl is None else {"tokenizer.chat_template": (tmpl, gguf.GGUFValueType.STRING, None)}
        write_gguf(path, f)
        e = Err()
        fp = lib.gguf_open(path.encode(), ctypes.byref(e))
        got = lib.tok_chat_detect(fp, ctypes.byref(e))
        lib.gguf_close(fp)
        n += 1
        check(got == want, "tok_chat_detect(%s) = %d, want %d" % (name, got, want))
    return n


# ---- main ------------------------------------------------------------------------------------

def main():
    t0 = time.time()
    strings = corpus() + EDGE + fuzz(300, 20240601)
    ours = Ours(MODEL)
    ref = Ref(MODEL)

    n_ids = compare_ids(ours, ref, strings, "model")
    n_dec = compare_decode(ours, ref, strings, "model")
    n_voc = compare_vocab(ours, ref, "model")
    n_cp, n_chunks = sweep(ours, ref, "model", 1)
    print("model: %d strings, %d id comparisons, %d decode checks, %d vocab checks, "
          "%d code points swept in %d chunks" % (len(strings), n_ids, n_dec, n_voc, n_cp, n_chunks))

    # invalid UTF-8 is an error naming the byte
    for bad, at in [(b"ab\xffcd", 2), (b"\xc3", 0), (b"ok \xe2\x82", 3), (b"\xed\xa0\x80", 1),
                    (b"\xc0\xaf", 0), (b"x\xf4\x90\x80\x80", 2)]:
        r = ours.encode(bad, False, False)
        check(isinstance(r, tuple) and r[1] == -84 and ("byte %d" % at) in r[2],
              "invalid UTF-8 %r gave %r" % (bad, r))

    template_text = gguf.GGUFReader(MODEL).fields["tokenizer.chat_template"].contents()
    n_chat = check_chat(ours, template_text)
    ours.close()

    with tempfile.TemporaryDirectory() as tmp:
        n_chat += check_detect(tmp)
        print("chat: %d renderings/detections compared" % n_chat)

        base = read_fields(MODEL)
        S = gguf.GGUFValueType
        sub = corpus() + EDGE[:60] + fuzz(120, 7)
        variants = [("gpt-2", {}), ("llama-bpe", {"-tokenizer.ggml.add_bos_token": None}),
                    ("qwen2", {}), ("default", {}), ("falcon", {}), ("starcoder", {}),
                    ("smollm", {"user-defined": 12})]
        for pre, extra in variants:
            f = dict(base)
            f["tokenizer.ggml.pre"] = (pre, S.STRING, None)
            for k in extra:
                if k.startswith("-"):
                    f.pop(k[1:], None)
            if "user-defined" in extra:  # make <jupyter_text> a user-defined token
                types = list(f["tokenizer.ggml.token_type"][0])
                types[extra["user-defined"]] = 4
                f["tokenizer.ggml.token_type"] = (types, S.ARRAY, S.INT32)
            path = os.path.join(tmp, "pre-%s.gguf" % pre)
            write_gguf(path, f)
            o, r = Ours(path), Ref(path)
            label = "pre=%s%s" % (pre, " +user-defined" if "user-defined" in extra else "")
            ni = compare_ids(o, r, sub, label)
            nd = compare_decode(o, r, sub[:40], label)
            nv = compare_vocab(o, r, label)
            ncp = sweep(o, r, label, 13)[0] if pre in ("qwen2", "llama-bpe", "default") else 0
            print("%s: %d strings, %d id comparisons, %d decode checks, %d vocab checks, "
                  "%d code points swept" % (label, len(sub), ni, nd, nv, ncp))
            o.close()

        path = os.path.join(tmp, "spm.gguf")
        write_gguf(path, spm_fields(base))
        o, r = Ours(path), Ref(path)
        spm_strings = sub + ["<tool>x<tool>", "a <|ctl|> b", " <s> </s> <unk> ", "<0x41>", "\u2581x"]
        ni = compare_ids(o, r, spm_strings, "spm")
        nd = compare_decode(o, r, spm_strings[:60], "spm", roundtrip=False)
        nv = compare_vocab(o, r, "spm")
        print("spm: %d strings, %d id comparisons, %d decode checks, %d vocab checks"
              % (len(spm_strings), ni, nd, nv))
        o.close()

    print("strings compared: %d on the model, %d on each of %d variants, %d on the SentencePiece "
          "vocabulary; %.1f s" % (len(strings), len(sub), len(variants), len(sub) + 5, time.time() - t0))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
