"""kustomize_lite — render the subset of kustomize that deploy/k8s uses, in plain Python.

Neither Debian nor PyPI ships kustomize or kubectl (the machine image may carry kubectl from the
Google Cloud SDK: test_manifests.py then checks that both render the same), so the deploy tests
render the kustomizations with this. It implements, with kustomize's semantics, only what deploy/k8s uses and refuses
everything else (so a kustomization that starts using a new field fails loudly here instead of
rendering differently from the real tool):

  resources          files (multi-document YAML) and directories holding a kustomization.yaml
  namespace          set on every namespaced object
  generatorOptions   disableNameSuffixHash: true only (kustomize's hash suffix is not emulated)
  configMapGenerator literals and files ("key=path" or the file's base name), behavior
                     create / merge / replace
  patches            path or inline patch, optional target {kind, name}; a mapping is a
                     strategic-merge patch, a list is a JSON 6902 patch (add, replace, remove)
  images             name -> newName / newTag / digest on containers and init containers

Strategic merge: mappings merge recursively, null deletes a key; the lists Kubernetes declares
with a merge key (containers, initContainers, volumes, env, volumeMounts, ports, ...) merge item
by item on that key, every other list is replaced. Usage: render(dir) -> list of objects.
"""
import copy
import os

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "namespace", "generatorOptions",
                "configMapGenerator", "patches", "images"}

# list field name -> merge key (from the Kubernetes API's patchMergeKey annotations)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
}

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "RuntimeClass",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}


class KustomizeError(Exception):
    pass


def _load_docs(path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise KustomizeError(f"{path}: not a Kubernetes object: {str(d)[:80]}")
    return docs


def _inside(root, path):
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise KustomizeError(f"{path}: outside the kustomization root {root} "
                             "(kustomize's load restrictor refuses it)")


def _smp_list(base, patch, key):
    """Merge-keyed list, ordered like kustomize (kyaml): the patch's items first, in the
    patch's order, then the base's items the patch does not name, in the base's order."""
    named = {item.get(key) for item in patch if isinstance(item, dict)}
    out = [copy.deepcopy(x) for x in base if isinstance(x, dict) and x.get(key) in named]
    out.sort(key=lambda x: [i.get(key) for i in patch].index(x.get(key)))
    rest = [copy.deepcopy(x) for x in base if not (isinstance(x, dict) and x.get(key) in named)]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise KustomizeError(f"strategic merge: list item without merge key {key}: {item}")
        idx = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item[key]),
                   None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del out[idx]
            continue
        if idx is None:
            out.append(copy.deepcopy(item))
        else:
            out[idx] = strategic_merge(out[idx], item)
    return out + rest


def strategic_merge(base, patch):
    """Strategic-merge patch of base by patch (both mappings); returns a new mapping."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if k == "$patch":
            raise KustomizeError("strategic merge: $patch directives on mappings are not supported")
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = strategic_merge(out[k], v)
        elif isinstance(v, list) and k in MERGE_KEYS and isinstance(out.get(k), list):
            out[k] = _smp_list(out[k], v, MERGE_KEYS[k])
        else:
            out[k] = copy.deepcopy(v)
    return out


def _pointer(path):
    if not path.startswith("/"):
        raise KustomizeError(f"JSON 6902: path must start with '/': {path}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json6902(obj, ops):
    obj = copy.deepcopy(obj)
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op.get("path", ""))
        parent = obj
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if kind in ("add", "replace"):
            val = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if last == "-":
                    parent.append(val)
                elif kind == "add":
                    parent.insert(int(last), val)
                else:
                    parent[int(last)] = val
            else:
                if kind == "replace" and last not in parent:
                    raise KustomizeError(f"JSON 6902 replace: {op['path']} does not exist")
                parent[last] = val
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise KustomizeError(f"JSON 6902: op {kind!r} is not supported")
    return obj


def _matches(obj, target):
    for k in target:
        if k not in ("kind", "name", "namespace"):
            raise KustomizeError(f"patch target field {k!r} is not supported")
    md = obj["metadata"]
    return (target.get("kind", obj["kind"]) == obj["kind"]
            and target.get("name", md.get("name")) == md.get("name")
            and target.get("namespace", md.get("namespace")) == md.get("namespace"))


def _gen_configmap(root, spec):
    data = {}
    for lit in spec.get("literals", []):
        if "=" not in lit:
            raise KustomizeError(f"configMapGenerator {spec['name']}: literal without '=': {lit}")
        k, v = lit.split("=", 1)
        data[k] = v
    for f in spec.get("files", []):
        key, path = f.split("=", 1) if "=" in f else (os.path.basename(f), f)
        full = os.path.join(root, path)
        _inside(root, full)
        with open(full, encoding="utf-8") as fh:
            data[key] = fh.read()
    for k in spec:
        if k not in ("name", "literals", "files", "behavior"):
            raise KustomizeError(f"configMapGenerator field {k!r} is not supported")
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": spec["name"]}, "data": data}


def _image_split(image):
    """'repo/name:tag' or 'repo/name@sha256:..' -> (name, rest)."""
    if "@" in image:
        n, d = image.split("@", 1)
        return n, "@" + d
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _set_images(obj, images):
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec") if "template" in spec else spec
    if not isinstance(pod, dict):
        return
    for field in ("initContainers", "containers"):
        for c in pod.get(field, []) or []:
            name, rest = _image_split(c.get("image", ""))
            for im in images:
                if im["name"] != name:
                    continue
                new = im.get("newName", name)
                if "digest" in im:
                    rest = "@" + im["digest"]
                elif "newTag" in im:
                    rest = ":" + str(im["newTag"])
                c["image"] = new + rest


def render(root):
    """Render the kustomization in directory root; returns the list of objects."""
    kpath = os.path.join(root, "kustomization.yaml")
    if not os.path.isfile(kpath):
        raise KustomizeError(f"{root}: no kustomization.yaml")
    with open(kpath, encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{kpath}: fields not supported by kustomize_lite: {sorted(unknown)}")
    objs = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(root, r))
        if os.path.isdir(p):
            objs.extend(render(p))
        else:
            _inside(root, p)
            objs.extend(_load_docs(p))

    gen = k.get("generatorOptions", {}) or {}
    if k.get("configMapGenerator") and not gen.get("disableNameSuffixHash"):
        raise KustomizeError(f"{kpath}: name hash suffixes are not emulated; "
                             "set generatorOptions.disableNameSuffixHash: true")
    for spec in k.get("configMapGenerator", []):
        cm = _gen_configmap(root, spec)
        behavior = spec.get("behavior", "create")
        same = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == spec["name"]]
        if behavior == "create":
            if same:
                raise KustomizeError(f"{kpath}: ConfigMap {spec['name']} already exists "
                                     "(use behavior: merge or replace)")
            objs.append(cm)
        elif behavior in ("merge", "replace"):
            if len(same) != 1:
                raise KustomizeError(f"{kpath}: behavior {behavior}: no ConfigMap {spec['name']}")
            if behavior == "merge":
                same[0].setdefault("data", {}).update(cm["data"])
            else:
                same[0]["data"] = cm["data"]
        else:
            raise KustomizeError(f"{kpath}: configMapGenerator behavior {behavior!r}")

    for p in k.get("patches", []):
        if "path" in p:
            full = os.path.join(root, p["path"])
            _inside(root, full)
            with open(full, encoding="utf-8") as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
        elif "patch" in p:
            docs = [d for d in yaml.safe_load_all(p["patch"]) if d is not None]
        else:
            raise KustomizeError(f"{kpath}: a patch needs path or patch")
        target = p.get("target")
        for d in docs:
            if isinstance(d, list):
                if not target:
                    raise KustomizeError(f"{kpath}: a JSON 6902 patch needs a target")
                hits = [i for i, o in enumerate(objs) if _matches(o, target)]
                for i in hits:
                    objs[i] = json6902(objs[i], d)
            else:
                t = target or {"kind": d.get("kind"), "name": d.get("metadata", {}).get("name")}
                hits = [i for i, o in enumerate(objs) if _matches(o, t)]
                for i in hits:
                    objs[i] = strategic_merge(objs[i], d)
            if not hits:
                raise KustomizeError(f"{kpath}: patch {p} matches no object")

    ns = k.get("namespace")
    if ns:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = ns

    images = k.get("images", [])
    if images:
        for o in objs:
            _set_images(o, images)

    seen = set()
    for o in objs:
        key = (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{kpath}: duplicate object {key}")
        seen.add(key)
    return objs


if __name__ == "__main__":
    import sys
    out = render(sys.argv[1] if len(sys.argv) > 1 else ".")
    yaml.safe_dump_all(out, sys.stdout, sort_keys=False)
