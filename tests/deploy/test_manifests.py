"""deploy/k8s: render base and overlays, validate every object against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors) and check the pod design the service
needs: both workers in one pod on one memory-backed segment volume, spill on local disk, native
gRPC probes on the right ports, termination grace longer than the drain, Services, GPUs and the
io_uring seccomp profile in the gpu overlay, and memory limits that cover what the configuration
asks for. When a real kustomize is found (IHIP_KUSTOMIZE=/path/to/kubectl-or-kustomize, or
kubectl / kustomize on PATH) its output must equal kustomize_lite's."""
import copy
import json
import os
import shutil
import subprocess

import deploy_common as dc

# Oldest Kubernetes we claim (grpc probes and appProtocol kubernetes.io/h2c need 1.27+) and the
# newest schema the pinned kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
MiB = 1 << 20


def qty(s):
    """Kubernetes quantity -> number (bytes for memory, cores for cpu)."""
    s = str(s)
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for u, m in sorted(units.items(), key=lambda x: -len(x[0])):
        if s.endswith(u):
            return float(s[: -len(u)]) * m
    return float(s)


def real_kustomize():
    exe = os.environ.get("IHIP_KUSTOMIZE") or shutil.which("kustomize") or shutil.which("kubectl")
    if not exe:
        return None
    return [exe, "kustomize"] if os.path.basename(exe).startswith("kubectl") else [exe, "build"]


def main():
    try:
        import kubernetes_validate
        import yaml
    except ImportError as e:
        dc.skip(f"kubernetes-validate / PyYAML missing ({e}); run scripts/setup.sh")
    t = dc.Checks()
    rendered = dc.render_all()

    # ---- schemas ---------------------------------------------------------------------------
    n_obj = 0
    for name, objs in rendered.items():
        for o in objs:
            for v in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(o, v, strict=True)
                    ok, msg = True, ""
                except Exception as e:  # ValidationError, SchemaNotFoundError
                    ok, msg = False, str(e).splitlines()[0]
                t.check(ok, f"{name}: {o['kind']}/{o['metadata']['name']} against {v}: {msg}")
            n_obj += 1
    # the validator really is strict: an unknown field and a wrong type are refused
    dep = dc.find(rendered["base"], "Deployment", "ihip")[0]
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    bad2 = copy.deepcopy(dep)
    bad2["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"
    for b, what in ((bad, "unknown field"), (bad2, "wrong type")):
        try:
            kubernetes_validate.validate(b, K8S_VERSIONS[0], strict=True)
            t.check(False, f"validator accepted a Deployment with a {what}")
        except Exception:
            t.check(True, "")
    print(f"validated {n_obj} rendered objects against Kubernetes {', '.join(K8S_VERSIONS)}")

    # ---- the real kustomize, when there is one -------------------------------------------
    real = real_kustomize()
    if real:
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        for name, objs in rendered.items():
            r = subprocess.run(real + [os.path.join(dc.K8S, name)], capture_output=True, text=True,
                               timeout=120)
            if not t.check(r.returncode == 0, f"{' '.join(real)} {name}: {r.stderr.strip()}"):
                continue
            theirs = [d for d in yaml.safe_load_all(r.stdout) if d]
            t.check(sorted(theirs, key=key) == sorted(objs, key=key),
                    f"{name}: kustomize_lite differs from {real[0]}")
        print(f"compared with {' '.join(real)}")
    else:
        print("no kustomize / kubectl found: rendered with kustomize_lite only")

    # ---- pod design ------------------------------------------------------------------------
    seccomp_file = os.path.join(dc.SRC, "deploy", "k8s", "seccomp", "ihip-io-uring.json")
    for name, objs in rendered.items():
        pod = dc.pod_spec(objs)
        (cm,) = dc.find(objs, "ConfigMap", "ihip-config")
        env = cm["data"]
        pre, dec = dc.container(pod, "prefill"), dc.container(pod, "decode")
        kvinit = dc.container(pod, "kv-init")
        vols = {v["name"]: v for v in pod["volumes"]}
        t.check([c["name"] for c in pod["initContainers"]] == ["fetch-model", "kv-init"],
                f"{name}: init containers fetch-model then kv-init")
        t.check(pod.get("shareProcessNamespace") is True, f"{name}: shareProcessNamespace")

        def mount_of(c, path):
            return next((m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == path),
                        None)

        kv_dir = env["IHIP_KV_DIR"]
        for c in (pre, dec, kvinit):
            v = mount_of(c, kv_dir)
            t.check(v == "kv", f"{name}: {c['name']} mounts the segment volume at {kv_dir}")
            t.check(mount_of(c, "/spill") == "spill", f"{name}: {c['name']} mounts /spill")
        t.check(vols["kv"]["emptyDir"].get("medium") == "Memory", f"{name}: kv is memory-backed")
        t.check("medium" not in vols["spill"]["emptyDir"], f"{name}: spill is on local disk")
        t.check(dc.arg_value(kvinit["args"], "--spill-dir") == "/spill",
                f"{name}: the segment's spill tier is in /spill")
        model_dir = os.path.dirname(env["IHIP_MODEL"])
        for c in (pre, dec):
            t.check(mount_of(c, model_dir) == "models", f"{name}: {c['name']} mounts the model")
            t.check(mount_of(c, os.path.dirname(env["IHIP_HIP_CONFIG"])) == "config",
                    f"{name}: {c['name']} mounts the HiP config")
            t.check({"configMapRef": {"name": "ihip-config"}} in c.get("envFrom", []),
                    f"{name}: {c['name']} takes the ConfigMap's environment")
            sc = c.get("securityContext", {})
            t.check(sc.get("allowPrivilegeEscalation") is False and
                    sc.get("capabilities", {}).get("drop") == ["ALL"],
                    f"{name}: {c['name']} drops privileges")
        t.check(pod["securityContext"].get("runAsNonRoot") is True, f"{name}: runs as non-root")

        # probes: native gRPC health on each container's own port, listen address matching
        for c, port_name in ((pre, "grpc-prefill"), (dec, "grpc-decode")):
            (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == port_name]
            t.check(dc.arg_value(c["args"], "--listen") == f"0.0.0.0:{port}",
                    f"{name}: {c['name']} listens on 0.0.0.0:{port}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe, {})
                t.check(p.get("grpc", {}).get("port") == port and "service" not in p["grpc"],
                        f"{name}: {c['name']} {probe} is grpc on {port} (overall health)")
        t.check(dc.arg_value(dec["args"], "--prefill") ==
                "127.0.0.1:" + dc.arg_value(pre["args"], "--listen").split(":")[1],
                f"{name}: decode calls its own pod's prefill worker")

        # graceful termination: longer than each worker's drain
        tg = pod["terminationGracePeriodSeconds"]

        def prestop(c):
            cmd = c["lifecycle"]["preStop"]["exec"]["command"]
            return float(cmd[1]) if cmd[0] == "sleep" else 0.0

        grace = int(dc.arg_value(dec["args"], "--grace-ms")) / 1000
        t.check(tg >= prestop(dec) + grace + 5,
                f"{name}: terminationGracePeriodSeconds {tg} < decode preStop + --grace-ms + 5 s")
        t.check(tg >= prestop(pre) + 0.5 + 5, f"{name}: grace too short for the prefill worker")
        t.check(prestop(pre) > prestop(dec), f"{name}: prefill outlives the decode drain")

        # Services
        (front,) = dc.find(objs, "Service", "ihip-decode")
        (headless,) = dc.find(objs, "Service", "ihip-prefill")
        (pods,) = dc.find(objs, "Service", "ihip-decode-pods")
        t.check(pods["spec"].get("clusterIP") == "None" and
                pods["spec"]["ports"][0]["targetPort"] == "grpc-decode",
                f"{name}: headless decode Service targets decode")
        labels = dc.find(objs, "Deployment", "ihip")[0]["spec"]["template"]["metadata"]["labels"]
        for s in (front, headless, pods):
            t.check(all(labels.get(k) == v for k, v in s["spec"]["selector"].items()),
                    f"{name}: Service {s['metadata']['name']} selects the worker pods")
        t.check(front["spec"]["ports"][0]["targetPort"] == "grpc-decode" and
                front["spec"].get("clusterIP") != "None", f"{name}: front door targets decode")
        t.check(headless["spec"].get("clusterIP") == "None" and
                headless["spec"]["ports"][0]["targetPort"] == "grpc-prefill",
                f"{name}: headless Service targets prefill")

        # GPUs and seccomp
        gpu = name.endswith("gpu")
        for c in (pre, dec):
            lim = c["resources"].get("limits", {})
            t.check(("nvidia.com/gpu" in lim) == gpu, f"{name}: {c['name']} nvidia.com/gpu request")
        sp = pod["securityContext"]["seccompProfile"]
        if gpu:
            t.check(sp == {"type": "Localhost", "localhostProfile": "profiles/ihip-io-uring.json"},
                    f"{name}: Localhost io_uring seccomp profile")
        else:
            t.check(sp == {"type": "RuntimeDefault"}, f"{name}: RuntimeDefault seccomp")

        # ---- sizing: limits cover what the configuration asks for -------------------------
        layers, heads, hd = (int(env[k]) for k in ("MODEL_LAYERS", "MODEL_KV_HEADS",
                                                    "MODEL_HEAD_DIM"))
        tpb = int(env["KVSTORE_TOKENS_PER_BLOCK"])
        tok_bytes = layers * 2 * heads * hd * 2  # f16 K and V of one token, all layers
        block_bytes = 2 * heads * hd * tpb * 2   # one layer of one token block
        ram = int(env["KVSTORE_RAM_BLOCKS"])
        spill = int(env["KVSTORE_SPILL_BLOCKS"])
        pool = ram * block_bytes
        model_bytes = os.path.getsize(dc.MODEL) if os.path.exists(dc.MODEL) else 100 * MiB
        margin = 256 * MiB
        ctx_d = int(dc.arg_value(dec["args"], "--ctx"))
        ctx_p = int(dc.arg_value(pre["args"], "--ctx"))
        seqs = int(dc.arg_value(dec["args"], "--max-seqs"))
        kvb = int(dc.arg_value(dec["args"], "--max-kv-bytes"))
        conc = int(dc.arg_value(pre["args"], "--max-concurrent"))
        t.check(kvb >= seqs * ctx_d * tok_bytes,
                f"{name}: --max-kv-bytes {kvb} < max-seqs x ctx x {tok_bytes} B")
        t.check(qty(dec["resources"]["limits"]["memory"]) >= kvb + model_bytes + margin,
                f"{name}: decode memory limit below --max-kv-bytes + model + 256 MiB")
        t.check(qty(pre["resources"]["limits"]["memory"]) >=
                conc * ctx_p * tok_bytes + pool + model_bytes + margin,
                f"{name}: prefill memory limit below contexts + segment pool + model + 256 MiB")
        t.check(qty(vols["kv"]["emptyDir"]["sizeLimit"]) >= pool + 64 * MiB,
                f"{name}: kv sizeLimit below the RAM pool ({pool} B) + tables")
        t.check(qty(vols["spill"]["emptyDir"]["sizeLimit"]) >= spill * block_bytes,
                f"{name}: spill sizeLimit below the spill file ({spill * block_bytes} B)")
        per_seq = -(-max(ctx_d, ctx_p) // tpb) * layers
        t.check(int(env["KVSTORE_BLOCKS_PER_SEQ"]) >= per_seq,
                f"{name}: KVSTORE_BLOCKS_PER_SEQ below a full context ({per_seq})")
        t.check(pool >= per_seq * block_bytes, f"{name}: RAM pool cannot hold one full context")

    # ---- the seccomp profile -----------------------------------------------------------------
    with open(seccomp_file, encoding="utf-8") as f:
        prof = json.load(f)
    allowed = set()
    for rule in prof["syscalls"]:
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args"):
            allowed.update(rule["names"])
    t.check(prof["defaultAction"] in ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL_PROCESS"),
            "seccomp: default action refuses")
    t.check({"io_uring_setup", "io_uring_enter", "io_uring_register"} <= allowed,
            "seccomp: io_uring allowed")
    dangerous = {"mount", "umount2", "ptrace", "bpf", "kexec_load", "init_module", "unshare",
                 "setns", "keyctl", "perf_event_open", "userfaultfd", "reboot", "pivot_root"}
    t.check(not (dangerous & allowed), f"seccomp: allows {sorted(dangerous & allowed)}")
    t.check({"futex", "mmap", "openat", "read", "write", "socket", "epoll_wait", "ioctl",
             "memfd_create", "pread64", "pwrite64"} <= allowed, "seccomp: basics allowed")
    clone3 = [r for r in prof["syscalls"] if "clone3" in r["names"]]
    t.check(clone3 and clone3[0].get("errnoRet") == 38,
            "seccomp: clone3 answers ENOSYS so glibc falls back to clone")
    t.finish()


if __name__ == "__main__":
    main()
