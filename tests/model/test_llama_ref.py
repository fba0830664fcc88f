"""Our CPU engine against llama.cpp (llama-cpp-python) on the same GGUF.

For each prompt (≥ 5; one ≥ 4000 tokens, one in chat form), both engines get the same token ids
(llama.cpp's tokenizer, so this test isolates the forward pass; the tokenizer has its own test):
  - the last-position logits are compared: KL(llama.cpp || ours) of the softmax, the max |diff|
    after removing the mean difference (a constant shift of all logits changes no probability;
    measured shifts reach ~0.9), and top-10 agreement, all bounded; the raw max |diff| is reported;
  - the greedy continuation of 32 tokens: llama.cpp runs greedily; we run teacher-forced on its
    tokens and our argmax must equal its token at every step, except where llama.cpp's own top-2
    logit gap is below TIE (a numerical tie: see below), which is counted and reported; we also run
    freely (our own greedy tokens) and report where, if anywhere, the two sequences part.

Why a tie margin: both engines quantise every activation vector to 8 bits before each matmul (as
llama.cpp does), so a perturbation of 3e-7 relative in the input moves the logits by up to ~0.5
(measured with a NumPy model of the same arithmetic); two correct implementations that sum floats
in a different order therefore differ by that much, and where the two best tokens are closer than
that, either may win. Bit-identical logits would need llama.cpp's exact summation order everywhere
(and its float32 RoPE, where we compute angles in double).
Same thread count for both. Prints a table and "N passed, N failed".
"""
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import ihip_ctypes as ic  # noqa: E402

ic.skip_if_missing()
import numpy as np  # noqa: E402

try:
    import llama_cpp
except ImportError:
    print("skip: llama_cpp not installed\n0 passed, 0 failed, 1 skipped")
    sys.exit(77)

N_GEN = int(os.environ.get("IHIP_TEST_NGEN", "32"))
THREADS = 2
# Bounds, set from measurement (see tests/bench/RESULTS.md "CPU engine vs llama.cpp"): our
# matmuls quantise activations exactly like llama.cpp; what differs is attention precision (we
# keep q and probabilities in f32, llama.cpp rounds them to f16) and RoPE angles (double here).
MAX_CENTERED_DIFF = 2.0  # max |d - mean(d)| over the vocabulary, d = ours - llama.cpp
MAX_KL = 0.05            # nats
MIN_TOP10 = 8
TIE = 0.25        # llama.cpp top-2 gap under which a different argmax counts as a tie
MAX_TIES = 2      # per prompt


def last_logits(llm):
    # llama-cpp-python 0.3.16 keeps no scores without logits_all; read the context's last row
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float32).copy()


def kl_div(ref, ours):
    """KL(softmax(ref) || softmax(ours)) in nats."""
    def lsm(x):
        x = x.astype(np.float64)
        m = x.max()
        return x - m - np.log(np.exp(x - m).sum())
    a, b = lsm(ref), lsm(ours)
    return float((np.exp(a) * (a - b)).sum())


def long_prompt():
    # ≥ 4000 tokens of real text: Python's own source of the `inspect` module (stable for a
    # given Python build; the venv uses Debian's python3.11).
    src = inspect.getsource(inspect)
    return "Summarise the following code.\n\n" + src[:17000]


CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n"
        "<|im_start|>assistant\n")

PROMPTS = [
    ("short", "The capital of France is", False),
    ("story", "Once upon a time, in a small village at the edge of a great forest, there lived", False),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("list", "Here are five tips for staying healthy:\n1.", False),
    ("chat", CHAT, True),
    ("long", long_prompt(), False),
]


def main():
    lib = ic.load()
    llm = llama_cpp.Llama(model_path=ic.MODEL, n_ctx=8192, n_threads=THREADS, n_threads_batch=THREADS,
                          n_batch=512, verbose=False)
    ours = ic.Engine(lib, n_ctx=8192, threads=THREADS)
    passed = failed = 0
    rows = []
    for name, text, special in PROMPTS:
        ids = llm.tokenize(text.encode(), add_bos=not special, special=special)
        # llama.cpp, greedy
        llm.reset()
        llm.eval(ids)
        ref_logits = last_logits(llm)
        ref_gen, ref_gap = [], []
        lg = ref_logits
        for _ in range(N_GEN):
            t = int(np.argmax(lg))
            top2 = np.sort(lg)[-2:]
            ref_gen.append(t)
            ref_gap.append(float(top2[1] - top2[0]))
            llm.eval([t])
            lg = last_logits(llm)
        # ours, free-running greedy
        ours.reset()
        lg = ours.prefill(ids)
        first = lg.copy()
        gen = []
        for _ in range(N_GEN):
            t = int(np.argmax(lg))
            gen.append(t)
            lg = ours.decode(t)
        # ours, teacher-forced on llama.cpp's tokens (identical to the free run when it matched)
        ties = hard = 0
        if gen != ref_gen:
            ours.reset()
            lg = ours.prefill(ids)
            for i, t in enumerate(ref_gen):
                a = int(np.argmax(lg))
                if a != t:
                    if ref_gap[i] < TIE:
                        ties += 1
                    else:
                        hard += 1
                        print(f"  {name}: step {i}: ours {a}, llama.cpp {t} (its top-2 gap {ref_gap[i]:.3f})")
                lg = ours.decode(t)
        dl = first.astype(np.float64) - ref_logits
        diff = float(np.max(np.abs(dl)))
        cdiff = float(np.max(np.abs(dl - dl.mean())))
        kl = kl_div(ref_logits, first)
        top_ref = set(np.argsort(-ref_logits)[:10].tolist())
        top_our = set(np.argsort(-first)[:10].tolist())
        agree = len(top_ref & top_our)
        same = gen == ref_gen
        first_div = next((i for i, (a, b) in enumerate(zip(gen, ref_gen)) if a != b), None)
        ok = (hard == 0 and ties <= MAX_TIES and cdiff <= MAX_CENTERED_DIFF and kl <= MAX_KL
              and agree >= MIN_TOP10)
        rows.append((name, len(ids), diff, cdiff, kl, agree, N_GEN - ties - hard, ties, same, first_div))
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {name}: ours {gen}\n      ref  {ref_gen}")
    print(f"{'prompt':8} {'tokens':>6} {'max|dlogit|':>11} {'centered':>8} {'KL':>8} {'top10':>5} "
          f"{'forced=':>7} {'ties':>4} {'free-run':>8}")
    for name, n, diff, cdiff, kl, agree, eq, ties, same, fd in rows:
        print(f"{name:8} {n:6d} {diff:11.4f} {cdiff:8.4f} {kl:8.5f} {agree:5d} {eq:4d}/{N_GEN} {ties:4d} "
              f"{('equal' if same else 'part@%d' % fd):>8}")
    ours.close()
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
