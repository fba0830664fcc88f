"""stack.py — helpers to start a real prefill + decode worker stack for integration tests.

The workers share a kvstore segment in a temporary --kv-dir and listen on ephemeral loopback
ports (each prints 'listening on PORT' on stdout). Used by tests/integration/test_decode_append.py
and tests/bench/decode_batch.py; test_decode_worker.py keeps its own copy of the same helpers.

Environment: IHIP_BIN (build/bin), IHIP_MODEL, IHIP_SRC.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("IHIP_SRC") or os.path.abspath(os.path.join(HERE, "..", ".."))
BIN = os.environ.get("IHIP_BIN") or os.path.join(SRC, "build", "bin")
MODEL = os.environ.get("IHIP_MODEL") or os.path.join(SRC, "models",
                                                      "SmolLM2-135M-Instruct-Q4_1.gguf")

_counts = {"pass": 0, "fail": 0}


def check(name, cond, detail=""):
    """Record and print one check; returns cond."""
    if cond:
        _counts["pass"] += 1
        print(f"ok   {name}", flush=True)
    else:
        _counts["fail"] += 1
        print(f"FAIL {name} {detail}", flush=True)
    return cond


def counts():
    return _counts["pass"], _counts["fail"]


def wait_for(pred, timeout=10.0, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def missing_binaries(names=("ihip-decode-worker", "ihip-prefill-worker", "ihip-kv")):
    """The first of `names` not built in BIN, or None."""
    for b in names:
        if not os.path.exists(os.path.join(BIN, b)):
            return b
    return None


def not_ready():
    """None when the workers, ihip-kv and the model are there; else prints the skip lines a
    test prints before exiting 77, and returns 77."""
    miss = missing_binaries()
    if miss:
        print(f"skip: {miss} not built in {BIN}\n0 passed, 0 failed")
        return 77
    if not os.path.exists(MODEL):
        print(f"skip: no model at {MODEL}\n0 passed, 0 failed")
        return 77
    return None


class Worker:
    """One worker process; reads 'listening on PORT' from its stdout, keeps its stderr."""

    def __init__(self, name, args):
        self.name = name
        self.proc = subprocess.Popen([os.path.join(BIN, name), *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="replace")
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (\d+)", line)
        if not m:
            err = self.proc.stderr.read()
            self.proc.wait()
            raise RuntimeError(f"{name} did not start: {line!r} {err[-2000:]}")
        self.port = int(m.group(1))
        self.addr = f"127.0.0.1:{self.port}"
        self.log = []
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def alive(self):
        return self.proc.poll() is None

    def rss_kb(self):
        """Resident set size of the process in KiB (-1 if unknown)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return -1

    def wait_serving(self, timeout=120):
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        ch = grpc.insecure_channel(self.addr)
        stub = health_pb2_grpc.HealthStub(ch)

        def ok():
            try:
                return stub.Check(health_pb2.HealthCheckRequest(service=""),
                                  timeout=2).status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False
        r = wait_for(ok, timeout, 0.1)
        ch.close()
        return r

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self._t.join(timeout=5)
        return rc


def run_worker(name, args):
    """Start `name` with args expecting it to fail at start: (exit code, stderr)."""
    r = subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True,
                       timeout=120)
    return r.returncode, r.stderr


class Stack:
    """A prefill worker creating the segment, and decode workers attached to it."""

    def __init__(self, kv_blocks=512, block_tokens=64, threads="1", prefill_ctx=2048,
                 handoff_ms=300):
        self.dir = tempfile.mkdtemp(prefix="ihip-st-")
        self.pport = free_port()
        self.kv_blocks, self.block_tokens, self.threads = kv_blocks, block_tokens, threads
        self.prefill_ctx, self.handoff_ms = prefill_ctx, handoff_ms
        self.prefill = None
        self.decode = None

    def start_prefill(self, *extra):
        self.prefill = Worker("ihip-prefill-worker", [
            "--model", MODEL, "--listen", f"127.0.0.1:{self.pport}", "--kv-dir", self.dir,
            "--kv-create", "--kv-blocks", str(self.kv_blocks), "--kv-block-tokens",
            str(self.block_tokens), "--threads", self.threads, "--handoff-ms",
            str(self.handoff_ms), "--max-concurrent", "2", "--ctx", str(self.prefill_ctx), *extra])
        return self.prefill

    def decode_args(self, *extra):
        return ["--model", MODEL, "--prefill", f"127.0.0.1:{self.pport}", "--kv-dir", self.dir,
                "--threads", self.threads, "--ctx", "1024", "--max-seqs", "4",
                "--max-prompt-tokens", "512", "--health-timeout-ms", "1000", *extra]

    def start_decode(self, *extra):
        self.decode = Worker("ihip-decode-worker", self.decode_args(*extra))
        return self.decode

    def kv(self, cmd):
        r = subprocess.run([os.path.join(BIN, "ihip-kv"), cmd, "ihip", "--dir", self.dir,
                            "--json"], capture_output=True, text=True, timeout=60)
        return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr + r.stdout}

    def kv_check(self):
        r = subprocess.run([os.path.join(BIN, "ihip-kv"), "check", "ihip", "--dir", self.dir],
                           capture_output=True, text=True, timeout=60)
        return r.returncode == 0, r.stdout + r.stderr

    def close(self):
        for w in (self.decode, self.prefill):
            if w:
                w.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
