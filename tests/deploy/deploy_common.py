"""Shared helpers of the deploy tests: paths, skipping, rendering, the binaries' --help, and a
seccomp filter that refuses io_uring like the default profiles of current container runtimes."""
import ctypes
import os
import platform
import re
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("IHIP_SRC") or os.path.abspath(os.path.join(HERE, "..", ".."))
BIN = os.environ.get("IHIP_BIN") or os.path.join(SRC, "build", "bin")
MODEL = os.environ.get("IHIP_MODEL") or os.path.join(SRC, "models", "SmolLM2-135M-Instruct-Q4_1.gguf")
K8S = os.path.join(SRC, "deploy", "k8s")
KUSTOMIZATIONS = ["base", "overlays/cpu-local", "overlays/gpu"]
SKIP = 77

sys.path.insert(0, HERE)


def skip(msg):
    print(f"SKIP: {msg}")
    sys.exit(SKIP)


class Checks:
    """Collects named checks; finish() prints 'N passed, N failed' and exits 0 or 1."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, cond, what):
        if cond:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL: {what}")
        return bool(cond)

    def finish(self):
        print(f"{self.passed} passed, {self.failed} failed")
        sys.exit(1 if self.failed else 0)


def render_all():
    try:
        import kustomize_lite  # needs PyYAML
    except ImportError as e:
        skip(f"PyYAML missing ({e}); run scripts/setup.sh")
    return {k: kustomize_lite.render(os.path.join(K8S, k)) for k in KUSTOMIZATIONS}


def find(objs, kind, name=None):
    out = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return out


def pod_spec(objs):
    (dep,) = find(objs, "Deployment", "ihip")
    return dep["spec"]["template"]["spec"]


def container(pod, name):
    for field in ("containers", "initContainers"):
        for c in pod.get(field, []):
            if c["name"] == name:
                return c
    raise KeyError(name)


def arg_value(args, flag):
    """Value following flag in an args list (None if absent)."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def expand(s, env):
    """Kubernetes $(VAR) expansion of command/args ($$ escapes; unknown names stay)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def help_text(binary, *args):
    """stdout + stderr of `binary args` (usage texts go to either)."""
    path = os.path.join(BIN, binary)
    if not os.access(path, os.X_OK):
        return None
    r = subprocess.run([path, *args], capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def flags_in(text):
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


# ---- seccomp: refuse io_uring_setup with EPERM, as runtime default profiles do ---------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_NR_IO_URING_SETUP = 425


def io_uring_blocker():
    """A preexec_fn for subprocess that installs a seccomp filter making io_uring_setup fail
    with EPERM (everything else allowed), or None when this is not x86-64 Linux."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    code = [  # (code, jt, jf, k)
        (0x20, 0, 0, 4),                          # ld [arch]
        (0x15, 0, 3, _AUDIT_ARCH_X86_64),         # jeq x86_64 ? next : allow
        (0x20, 0, 0, 0),                          # ld [nr]
        (0x15, 0, 1, _NR_IO_URING_SETUP),         # jeq io_uring_setup ? errno : allow
        (0x06, 0, 0, 0x00050000 | 1),             # ret SECCOMP_RET_ERRNO | EPERM
        (0x06, 0, 0, 0x7FFF0000),                 # ret SECCOMP_RET_ALLOW
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in code)

    def install():
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(raw, len(raw))

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        prog = SockFprog(len(code), ctypes.cast(buf, ctypes.c_void_p))
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            os._exit(126)
        if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
            os._exit(126)

    return install
