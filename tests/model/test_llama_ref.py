"""Our CPU engine against llama.cpp (llama-cpp-python) on the same GGUF.

For each prompt (≥ 5; one ≥ 4000 tokens, one in chat form), both engines get the same token ids
(llama.cpp's tokenizer, so this test isolates the forward pass; the tokenizer has its own test):
  - the last-position logits are compared: max |diff| and top-10 agreement, both bounded;
  - the greedy continuation of 32 tokens must be identical.
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
MAX_ABS_DIFF = 0.35
MIN_TOP10 = 8


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
        # llama.cpp
        llm.reset()
        llm.eval(ids)
        ref_logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        ref_gen = []
        for _ in range(N_GEN):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            ref_gen.append(t)
            llm.eval([t])
        # ours
        ours.reset()
        lg = ours.prefill(ids)
        first = lg.copy()
        gen = []
        for _ in range(N_GEN):
            t = int(np.argmax(lg))
            gen.append(t)
            lg = ours.decode(t)
        diff = float(np.max(np.abs(first - ref_logits)))
        top_ref = set(np.argsort(-ref_logits)[:10].tolist())
        top_our = set(np.argsort(-first)[:10].tolist())
        agree = len(top_ref & top_our)
        same = gen == ref_gen
        first_div = next((i for i, (a, b) in enumerate(zip(gen, ref_gen)) if a != b), None)
        ok = same and diff <= MAX_ABS_DIFF and agree >= MIN_TOP10
        rows.append((name, len(ids), diff, agree, same, first_div))
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {name}: ours {gen}\n      ref  {ref_gen}")
    print(f"{'prompt':8} {'tokens':>6} {'max|dlogit|':>11} {'top10':>5} {'greedy32':>8}")
    for name, n, diff, agree, same, fd in rows:
        print(f"{name:8} {n:6d} {diff:11.4f} {agree:5d} {('equal' if same else 'diff@%d' % fd):>8}")
    ours.close()
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
