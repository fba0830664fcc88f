#!/usr/bin/env python3
"""test_python_client.py — runs tests/clients/python/client.py (a grpcio client that knows our API
only through server reflection) as a script against a started local stack (one prefill worker and
one decode worker sharing a kvstore segment in a temporary directory), and checks what it prints:
health SERVING, the services listed by reflection, the decoded Generator descriptor, ModelInfo,
Tokenize equal to `ihip tokenize`, and a streamed Generate equal to `ihip generate --temp 0
--attention hip`. Also: the client exits 1 and prints the status when the worker refuses.

Environment: IHIP_BIN, IHIP_MODEL, IHIP_SRC. Exit 0 pass, 1 fail, 77 skip.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("IHIP_SRC") or os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(SRC, "tests", "integration"))

try:
    import grpc  # noqa: F401
    import test_decode_worker as tdw
except ImportError as e:
    print(f"skip: grpcio missing ({e})")
    print("0 passed, 0 failed")
    sys.exit(77)

CLIENT = os.path.join(SRC, "tests", "clients", "python", "client.py")
N_PASS = 0
N_FAIL = 0


def check(name, cond, detail=""):
    global N_PASS, N_FAIL
    if cond:
        N_PASS += 1
        print(f"ok   {name}", flush=True)
    else:
        N_FAIL += 1
        print(f"FAIL {name} {detail}", flush=True)
    return cond


def run_client(addr, *args):
    r = subprocess.run([sys.executable, CLIENT, "--addr", addr, *args], capture_output=True,
                       text=True, timeout=300)
    res = None
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
    return r.returncode, r.stdout, res


def main():
    for b in ("ihip-decode-worker", "ihip-prefill-worker", "ihip"):
        if not os.path.exists(os.path.join(tdw.BIN, b)):
            print(f"skip: {b} not built in {tdw.BIN}")
            print("0 passed, 0 failed")
            return 77
    if not os.path.exists(tdw.MODEL):
        print(f"skip: no model at {tdw.MODEL}")
        print("0 passed, 0 failed")
        return 77
    st = tdw.Stack()
    try:
        st.start_prefill()
        dec = st.start_decode()
        check("stack SERVING", st.prefill.wait_serving() and dec.wait_serving())
        prompt = "The capital of France is"
        rc, out, res = run_client(dec.addr, "--prompt", prompt, "--max-tokens", "16")
        check("client exits 0 and prints a RESULT line", rc == 0 and res is not None, out[-2000:])
        if not res:
            return 1
        check("health of the server and of the Generator: SERVING",
              res["health"] == "SERVING" and res["health_generator"] == "SERVING", str(res))
        check("reflection lists our services", {"infinitehip.v1.Generator",
                                                 "infinitehip.v1.Admin",
                                                 "grpc.health.v1.Health"} <= set(res["services"]),
              str(res["services"]))
        gm = res["generator_methods"]
        check("decoded descriptor: Generate is server streaming with our message types",
              gm.get("Generate") == ["infinitehip.v1.GenerateRequest",
                                     "infinitehip.v1.GenerateResponse", False, True], str(gm))
        check("decoded descriptor: Tokenize and ModelInfo are unary, GenerateStream bidi",
              gm.get("Tokenize", [0, 0, 1, 1])[2:] == [False, False] and
              gm.get("ModelInfo", [0, 0, 1, 1])[2:] == [False, False] and
              gm.get("GenerateStream", [0, 0, 0, 0])[2:] == [True, True], str(gm))
        check("descriptor file is infinitehip/v1/generator.proto",
              res["generator_file"] == "infinitehip/v1/generator.proto", res["generator_file"])
        check("ModelInfo: 30 layers, vocab 49152",
              res["model"]["n_layer"] == 30 and res["model"]["n_vocab"] == 49152)
        ref_ids = subprocess.run([os.path.join(tdw.BIN, "ihip"), "tokenize", "-m", tdw.MODEL,
                                  "-p", prompt], capture_output=True, text=True,
                                 timeout=60).stdout.split()
        check("Tokenize equals `ihip tokenize`", res["prompt_ids"] == [int(x) for x in ref_ids])
        want = tdw.reference(prompt)
        check("streamed Generate equals `ihip generate --temp 0 --attention hip`",
              res["text"] == want, f"{res['text']!r} vs {want!r}")
        check("16 tokens, finish LENGTH, usage", len(res["ids"]) == 16 and
              res["finish"] == "FINISH_REASON_LENGTH" and res["usage"]["generated"] == 16 and
              res["usage"]["prompt"] == len(ref_ids), str(res))
        check("the text was streamed as it came (printed before the summary)",
              want in out.split("RESULT ")[0])
        rc, out, res = run_client(dec.addr, "--prompt", "", "--max-tokens", "4")
        check("an empty prompt: exit 1, INVALID_ARGUMENT printed",
              rc == 1 and res and res.get("error") == "INVALID_ARGUMENT", out[-500:])
    finally:
        st.close()
    print(f"{N_PASS} passed, {N_FAIL} failed")
    return 1 if N_FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
