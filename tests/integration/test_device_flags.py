#!/usr/bin/env python3
"""test_device_flags.py — the workers' --device flag on a machine without a GPU.

Both workers take --device cpu|cuda (issue 7). Without a usable GPU — a build without CUDA, or a
CUDA build on a machine where no device is visible (this CI machine) — --device cuda must stop
at start-up with a non-zero exit and a message that says why (CUDA / GPU / device), never hang
or crash (the port is bound early so that health can report NOT_SERVING while the model loads;
the process then exits, so nothing stays listening); an unknown device name is refused with a message naming the flag,
and so is a negative --gpu-stage-tokens (prefill) / --gpu-probe-cache-tokens (decode), both listed in --help. With a
GPU visible the cuda case is skipped (tests/cuda/gpu-service-smoke.sh covers it on the H200).

Exit 0 pass, 1 fail, 77 skip (no model or binaries).
"""
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import stack  # noqa: E402
from stack import check  # noqa: E402


def gpu_visible():
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return r.returncode == 0 and "GPU" in r.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def start(worker, args, timeout=120):
    """Run a worker that is expected to stop by itself; returns (rc, stderr) or (None, ...)."""
    try:
        r = subprocess.run([os.path.join(stack.BIN, worker)] + args, capture_output=True,
                           text=True, timeout=timeout)
        return r.returncode, r.stderr + r.stdout
    except subprocess.TimeoutExpired as e:
        return None, f"still running after {timeout} s: {e}"


def main():
    if stack.not_ready():
        return 77
    gpu = gpu_visible()
    with tempfile.TemporaryDirectory(prefix="ihip-devflags-") as d:
        for worker in ("ihip-prefill-worker", "ihip-decode-worker"):
            port = stack.free_port()
            common = ["--model", stack.MODEL, "--listen", f"127.0.0.1:{port}", "--kv-dir", d,
                      "--kv-name", f"dev{port}"]
            if worker == "ihip-prefill-worker":
                common.append("--kv-create")
            else:
                common += ["--prefill", f"127.0.0.1:{stack.free_port()}"]
            # the GPU sizing flags: listed in --help, a negative value refused naming the flag
            flag = ("--gpu-stage-tokens" if worker == "ihip-prefill-worker"
                    else "--gpu-probe-cache-tokens")
            rc, out = start(worker, ["--help"])
            check(f"{worker} --help lists {flag}", flag in out, out[-300:])
            rc, err = start(worker, common + ["--device", "cuda", flag, "-1"])
            check(f"{worker} {flag} -1 is refused", rc not in (None, 0), f"rc {rc}: {err[-300:]}")
            check(f"{worker} {flag} -1: the message names the flag", flag in err, err[-300:])
            rc, err = start(worker, common + ["--device", "tpu"])
            check(f"{worker} --device tpu is refused", rc not in (None, 0), f"rc {rc}: {err[-300:]}")
            check(f"{worker} --device tpu: the message names the flag",
                  "--device" in err and "tpu" in err, err[-300:])
            if gpu:
                print(f"skip: a GPU is visible; {worker} --device cuda is covered on the GPU")
                continue
            rc, err = start(worker, common + ["--device", "cuda"])
            check(f"{worker} --device cuda without a GPU stops at start-up",
                  rc not in (None, 0), f"rc {rc}: {err[-300:]}")
            check(f"{worker} --device cuda without a GPU: the message says why",
                  re.search(r"CUDA|GPU|device", err) is not None
                  and not re.search(r"Segmentation|Aborted|AddressSanitizer", err), err[-400:])
    p, f = stack.counts()
    print(f"{p} passed, {f} failed")
    return 1 if f else 0


if __name__ == "__main__":
    sys.exit(main())
