"""Run the cpu-local pod on this machine, exactly as rendered: the fetch-model and kv-init init
steps, then the prefill and decode containers with their command, args and ConfigMap
environment, the pod's volumes mapped to temporary directories (the ConfigMap volume written as
files, like the kubelet does) and the ports to free loopback ports. Everything runs under a
seccomp filter that refuses io_uring_setup, as the runtime default profiles of current container
runtimes do, so this also checks that the service starts on the pread fallback and says so.

Checks: the init steps succeed (and kv-init again, as after a pod sandbox restart), both workers
report SERVING on grpc.health.v1 (what the native gRPC probes ask), a Generate through the front
door gives the same greedy text as `ihip generate` with the same attention settings, the segment
holds the prompt, both workers log the pread fallback, and SIGTERM ends both with status 0
within the pod's termination grace."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import deploy_common as dc

PROMPT = "The capital of France is"
N_TOKENS = 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    for b in ("ihip", "ihip-kv", "ihip-prefill-worker", "ihip-decode-worker"):
        if not os.access(os.path.join(dc.BIN, b), os.X_OK):
            dc.skip(f"{b} not built in {dc.BIN}")
    if not os.path.exists(dc.MODEL):
        dc.skip(f"model {dc.MODEL} missing (scripts/setup.sh downloads it)")
    t = dc.Checks()
    objs = dc.render_all()["overlays/cpu-local"]
    pod = dc.pod_spec(objs)
    (cm,) = dc.find(objs, "ConfigMap", "ihip-config")
    data = cm["data"]
    if os.path.basename(dc.MODEL) != data["MODEL_FILE"]:
        dc.skip(f"IHIP_MODEL is {dc.MODEL}, the manifests deploy {data['MODEL_FILE']}")
    blocker = dc.io_uring_blocker()
    if blocker is None:
        print("not x86-64 Linux: io_uring is not blocked, the fallback is not checked")

    tmp = tempfile.mkdtemp(prefix="ihip-pod-")
    procs = []
    try:
        # ---- volumes -> local directories --------------------------------------------------
        local = {}
        for v in pod["volumes"]:
            if v["name"] == "models":
                local["models"] = os.path.dirname(os.path.abspath(dc.MODEL))
            elif "configMap" in v:
                d = os.path.join(tmp, v["name"])
                os.makedirs(d)
                for k, val in data.items():
                    if "." in k:  # file keys (literals are environment variables)
                        with open(os.path.join(d, k), "w", encoding="utf-8") as f:
                            f.write(val)
                local[v["name"]] = d
            else:
                local[v["name"]] = os.path.join(tmp, v["name"])
                os.makedirs(local[v["name"]])
        t.check(data["IHIP_MODEL"].endswith("/" + data["MODEL_FILE"]),
                "IHIP_MODEL names the file fetch-model fetches")
        ports = {}
        for c in pod["containers"]:
            for p in c.get("ports", []):
                ports[str(p["containerPort"])] = str(free_port())

        def localize(c, s):
            for m in sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
                mp = m["mountPath"]
                if s == mp or s.startswith(mp + "/"):
                    return local[m["name"]] + s[len(mp):]
            for cport, lport in ports.items():
                if s.endswith(":" + cport):
                    return "127.0.0.1:" + lport
            return s

        def command(c):
            env = {}
            for ef in c.get("envFrom", []):
                env.update(data)
            env.update({e["name"]: e.get("value", "") for e in c.get("env", [])})
            env = {k: localize(c, v) for k, v in env.items()}
            words = [localize(c, dc.expand(w, env)) for w in c["command"] + c.get("args", [])]
            full = {"PATH": dc.BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": tmp, "LANG": "C.UTF-8", **env}
            return words, full

        # ---- init containers, in order ----------------------------------------------------------
        for c in pod["initContainers"]:
            words, env = command(c)
            if c["name"] == "fetch-model":
                env["MODEL_DIR"] = local["models"]  # the script's /models
                words = ["sh", os.path.join(local["config"], "fetch-model.sh")]
            elif words[0] == "ihip-kv-init":
                words[0] = os.path.join(dc.SRC, "deploy", "docker", "ihip-kv-init.sh")
            runs = 2 if c["name"] == "kv-init" else 1
            for i in range(runs):
                r = subprocess.run(words, env=env, capture_output=True, text=True, timeout=120,
                                   preexec_fn=blocker)
                t.check(r.returncode == 0, f"init {c['name']} (run {i + 1}): {r.stdout}{r.stderr}")
                if c["name"] == "fetch-model":
                    t.check("checksum ok" in r.stdout, f"fetch-model verified the model: {r.stdout}")
                if c["name"] == "kv-init" and i == 1:
                    t.check("exists" in r.stderr, f"kv-init keeps an existing segment: {r.stderr}")
        seg = os.path.join(local["kv"], "ihip-" + data["IHIP_KV_NAME"])
        spill = os.path.join(local["spill"], "ihip-" + data["IHIP_KV_NAME"] + ".spill")
        t.check(os.path.exists(seg) and os.path.exists(spill), "segment and spill file created")

        # ---- the workers ------------------------------------------------------------------------
        logs = {}
        strace = shutil.which("strace")
        if strace and subprocess.run([strace, "-qq", "-o", os.devnull, "true"],
                                     capture_output=True).returncode != 0:
            strace = None  # ptrace not permitted here
        traces = {}
        for c in pod["containers"]:
            words, env = command(c)
            words[0] = os.path.join(dc.BIN, words[0])
            if strace:  # record the syscalls the workers make, for the seccomp profile check
                traces[c["name"]] = os.path.join(tmp, c["name"] + ".trace")
                words = [strace, "-f", "-qq", "-o", traces[c["name"]]] + words
            logs[c["name"]] = open(os.path.join(tmp, c["name"] + ".log"), "w+", encoding="utf-8")
            procs.append((c["name"], subprocess.Popen(words, env=env, stdout=logs[c["name"]],
                                                      stderr=subprocess.STDOUT,
                                                      preexec_fn=blocker)))
        ihip = os.path.join(dc.BIN, "ihip")
        addr = {}
        for c in pod["containers"]:
            (p,) = [str(p["containerPort"]) for p in c["ports"]]
            addr[c["name"]] = "127.0.0.1:" + ports[p]
            r = subprocess.run([ihip, "health", "--addr", addr[c["name"]], "--timeout-ms", "120000"],
                               capture_output=True, text=True, timeout=150)
            t.check(r.returncode == 0, f"{c['name']} SERVING: {r.stdout}{r.stderr}")

        # ---- one request through the front door ---------------------------------------------
        r = subprocess.run([ihip, "chat", "--addr", addr["decode"], "--raw", "-p", PROMPT, "-n",
                            str(N_TOKENS), "--temp", "0", "--timeout-ms", "300000"],
                           capture_output=True, text=True, timeout=330)
        t.check(r.returncode == 0 and r.stdout.strip(), f"Generate through decode: {r.stderr}")
        answer = r.stdout
        ref = [ihip, "generate", "-m", dc.MODEL, "-p", PROMPT, "-n", str(N_TOKENS), "--temp", "0",
               "--quiet", "-t", "2", "--attention", data["IHIP_ATTENTION"]]
        if data["IHIP_ATTENTION"] == "hip":
            ref += ["--hip-preset", data["IHIP_HIP_PRESET"],
                    "--hip-config", os.path.join(local["config"], "hip.json")]
        r = subprocess.run(ref, capture_output=True, text=True, timeout=300)
        t.check(r.returncode == 0, f"ihip generate: {r.stderr}")
        print(f"front door answered {answer!r}")
        t.check(answer.strip() == r.stdout.strip(),
                f"decode answer {answer!r} != ihip generate {r.stdout!r}")
        st = subprocess.run([os.path.join(dc.BIN, "ihip-kv"), "stats", data["IHIP_KV_NAME"],
                             "--dir", local["kv"]], capture_output=True, text=True, timeout=60,
                            preexec_fn=blocker)
        t.check("blocks:" in st.stdout and " 0 used" not in st.stdout,
                f"the segment holds the prompt: {st.stdout}")
        if blocker:
            t.check("spill I/O: pread" in st.stdout, f"spill I/O falls back to pread: {st.stdout}")

        # ---- SIGTERM: both end with 0 within the grace ---------------------------------------
        tg = pod["terminationGracePeriodSeconds"]
        t0 = time.monotonic()
        for _, p in procs:
            # under strace the worker is strace's child: signal it, as the kubelet would
            kids = []
            if strace:
                with open(f"/proc/{p.pid}/task/{p.pid}/children", encoding="ascii") as f:
                    kids = [int(x) for x in f.read().split()]
            for pid in kids or [p.pid]:
                os.kill(pid, signal.SIGTERM)
        for name, p in procs:
            try:
                rc = p.wait(timeout=tg)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = "timeout"
            t.check(rc == 0, f"{name} exit status after SIGTERM: {rc}")
        t.check(time.monotonic() - t0 < tg, "both stopped within terminationGracePeriodSeconds")
        for name, f in logs.items():
            f.seek(0)
            text = f.read()
            print(f"{name}: " + " | ".join(ln for ln in text.splitlines() if "pread" in ln))
            if blocker:
                t.check("io_uring unavailable" in text and "I/O backend pread" in text,
                        f"{name} logs the pread fallback:\n{text[-2000:]}")
        # ---- the syscalls they made are all allowed by the gpu overlay's seccomp profile ----
        if traces:
            with open(os.path.join(dc.K8S, "seccomp", "ihip-io-uring.json"), encoding="utf-8") as f:
                prof = json.load(f)
            # allowed, or answered ENOSYS so that libc falls back (clone3 -> clone)
            allowed = {n for r in prof["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" or
                       r.get("errnoRet") == 38 for n in r["names"]}
            for name, path in traces.items():
                with open(path, encoding="utf-8", errors="replace") as f:
                    seen = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", f.read(), re.M))
                print(f"{name}: {len(seen)} distinct syscalls traced")
                t.check(len(seen) > 20, f"{name}: strace recorded syscalls")
                t.check(seen <= allowed, f"{name}: syscalls outside the seccomp profile: "
                                         f"{sorted(seen - allowed)}")
        else:
            print("strace not usable: the seccomp profile is not checked against real syscalls")
        procs = []
    finally:
        for _, p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    t.finish()


if __name__ == "__main__":
    main()
