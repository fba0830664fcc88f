#!/usr/bin/env python3
"""test_drain.py — graceful drain of the decode worker (--drain-ms), with real processes.

On SIGTERM a decode worker started with --drain-ms reports NOT_SERVING, refuses new calls with
UNAVAILABLE, and lets the streams already running finish normally (status OK, all their tokens)
before it exits 0. Without --drain-ms (default 0) running streams end at once with UNAVAILABLE;
that path is covered by test_decode_worker.py (test_sigterm).

Exit 0 pass, 1 fail, 77 skip (no model, binaries or grpcio).
"""
import os
import signal
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import stack  # noqa: E402
from stack import check, wait_for  # noqa: E402

sys.path.insert(0, os.path.join(stack.SRC, "tests", "clients", "python"))
try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from client import Api, collect
except ImportError as e:
    print(f"skip: grpcio / grpcio-health-checking / grpcio-reflection missing ({e})")
    print("0 passed, 0 failed")
    sys.exit(77)

GREEDY = {"temperature": 0.0}


def main():
    if stack.not_ready():
        return 77
    st = stack.Stack()
    try:
        st.start_prefill()
        dec = st.start_decode("--drain-ms", "60000", "--kv-retain", "none")
        check("workers SERVING", st.prefill.wait_serving() and dec.wait_serving())
        ch = grpc.insecure_channel(dec.addr)
        api = Api(ch)
        want = 160
        result = {}

        def long_call():
            try:
                result["r"] = collect(api.generate(chat=[("user", "Tell me a long story about a dragon.")],
                                                   max_tokens=want, sampling=GREEDY,
                                                   timeout=300))
            except grpc.RpcError as e:
                result["err"] = e
        t = threading.Thread(target=long_call)
        t.start()
        # wait until the stream is decoding, then ask the worker to stop
        check("stream decoding", wait_for(lambda: api.stats().get("decode.sequences_active", 0)
                                          > 0, 120), str(api.stats()))
        dec.proc.send_signal(signal.SIGTERM)
        hs = health_pb2_grpc.HealthStub(ch)
        check("NOT_SERVING while draining",
              wait_for(lambda: hs.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                       .status == health_pb2.HealthCheckResponse.NOT_SERVING, 10))
        try:
            collect(api.generate(prompt="hello", max_tokens=4, sampling=GREEDY, timeout=30))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        check("a new call while draining gets UNAVAILABLE", code == grpc.StatusCode.UNAVAILABLE,
              str(code))
        t.join(timeout=300)
        r = result.get("r")
        check("the running stream finished normally (Finished, status OK)",
              r is not None and r[2] is not None and len(r[1]) >= 1,
              f"{result.get('err')!r} {len(r[1]) if r else None} tokens")
        t0 = time.time()
        rc = dec.proc.wait(timeout=60)
        check("the worker exits 0 once drained", rc == 0, f"rc {rc} after {time.time() - t0:.1f} s")
        check("log says it drained", any("drain" in line for line in dec.log),
              "".join(dec.log)[-500:])
        ch.close()
    finally:
        st.close()
    print(f"{stack.counts()[0]} passed, {stack.counts()[1]} failed")
    return 1 if stack.counts()[1] else 0


if __name__ == "__main__":
    sys.exit(main())
