"""Render a kustomization directory in Python, for the subset of kustomize that deploy/kubernetes uses.

    python deploy/render.py deploy/kubernetes/overlays/gpu      # prints the objects as multi-document YAML

The tests render the overlays with this instead of a kustomize binary, so it supports only what the manifests use
and raises UnsupportedFeature for anything else; it never guesses. Supported kustomization.yaml fields:

  resources   files, or directories holding a kustomization.yaml (rendered first, recursively)
  patches     entries with only `path:` to a strategic-merge patch that names its target by kind and name
  namespace   set on every namespaced object
  images      name -> newName / newTag / digest, on containers and initContainers

Strategic merge follows Kubernetes' rules for the fields involved: maps merge key by key, a null value deletes a
key, lists of containers / volumes / env merge by their merge key (name, or mountPath for volumeMounts), lists
that Kubernetes treats as atomic (args, tolerations, HPA metrics, ...) are replaced. A list in neither table
raises, rather than risk merging it differently from kustomize. Only built-in kinds may be patched (custom
resources get JSON merge patches in kustomize).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "images"}

# patchMergeKey of the list fields in the objects we patch (from the Kubernetes API types).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
# List fields of objects without a patch strategy: a patch replaces them whole.
ATOMIC_LISTS = {"args", "command", "envFrom", "tolerations", "metrics", "policies", "accessModes"}
# Strategic merge needs the Go types of an object; custom resources get JSON merge patches instead. Only built-in
# kinds may be patched here.
PATCHABLE_API_VERSIONS = {"v1", "apps/v1", "autoscaling/v2", "policy/v1"}

CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                        "PersistentVolume", "StorageClass", "PriorityClass", "APIService",
                        "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}


class UnsupportedFeature(ValueError):
    """The kustomization uses something this renderer does not implement."""


def render(directory: str | Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` would print (in load order)."""
    directory = Path(directory)
    kustomization = _read_kustomization(directory)
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedFeature(f"{directory}: kustomization fields {sorted(unknown)} are not supported")

    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            objects.extend(_load_yaml_documents(path))
        else:
            raise FileNotFoundError(f"{directory}: resource {entry!r} does not exist (remote bases are unsupported)")

    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise UnsupportedFeature(f"{directory}: only `patches: - path: FILE` entries are supported, got "
                                     f"{sorted(patch_entry)}")
        for patch in _load_yaml_documents(directory / patch_entry["path"]):
            _apply_patch(objects, patch, directory / patch_entry["path"])

    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]

    for image in kustomization.get("images", []):
        _set_image(objects, image)
    return objects


def _read_kustomization(directory: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return yaml.safe_load((directory / name).read_text(encoding="utf-8")) or {}
    raise FileNotFoundError(f"{directory} has no kustomization.yaml")


def _load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


# ---- strategic merge patches ---------------------------------------------------------------------------------
def _apply_patch(objects: list[dict], patch: dict, source: Path) -> None:
    kind, name = patch.get("kind"), patch.get("metadata", {}).get("name")
    targets = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
               and o["apiVersion"] == patch.get("apiVersion")]
    if len(targets) != 1:
        raise ValueError(f"{source}: patch for {patch.get('apiVersion')} {kind}/{name} matches "
                         f"{len(targets)} objects, expected 1")
    if patch.get("apiVersion") not in PATCHABLE_API_VERSIONS:
        raise UnsupportedFeature(f"{source}: strategic merge of {patch.get('apiVersion')} objects is not supported")
    if "namespace" in patch.get("metadata", {}):
        raise UnsupportedFeature(f"{source}: patches that set metadata.namespace are not supported")
    merged = strategic_merge(targets[0], patch)
    targets[0].clear()
    targets[0].update(merged)


def strategic_merge(base: dict, patch: dict, path: str = "") -> dict:
    """Merge ``patch`` into a copy of ``base`` following the Kubernetes strategic-merge rules described above."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        where = f"{path}.{key}" if path else key
        if key.startswith("$"):
            raise UnsupportedFeature(f"patch directive {where} is not supported")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value, where)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = _merge_list(key, out[key], value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(key: str, base: list, patch: list, where: str) -> list:
    merge_key = MERGE_KEYS.get(key)
    if merge_key is None:
        if key in ATOMIC_LISTS:
            return copy.deepcopy(patch)
        raise UnsupportedFeature(f"{where}: this renderer does not know how Kubernetes merges the list {key!r}")
    # kustomize's order: the patch's items (merged with their base item) in patch order, then the base-only items.
    by_key = {item.get(merge_key): item for item in base}
    out = [strategic_merge(by_key[item.get(merge_key)], item, f"{where}[{merge_key}={item.get(merge_key)}]")
           if item.get(merge_key) in by_key else copy.deepcopy(item) for item in patch]
    patched = {item.get(merge_key) for item in patch}
    return out + [copy.deepcopy(item) for item in base if item.get(merge_key) not in patched]


# ---- images ----------------------------------------------------------------------------------------------------
def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """``registry:5000/repo/name:tag@sha256:...`` -> (name, tag, digest)."""
    name, _, digest = ref.partition("@")
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def _set_image(objects: list[dict], image: dict) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise UnsupportedFeature(f"images fields {sorted(unknown)} are not supported")
    for container in _containers(objects):
        name, tag, digest = split_image(container.get("image", ""))
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
        else:
            tag = image.get("newTag", tag)
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _containers(node):
    """Every container and init container in any object (walks the whole tree, as kustomize's image filter)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


class _BlockStyleDumper(yaml.SafeDumper):
    """Prints multi-line strings (embedded config files) as `|` blocks, the way they are written."""


_BlockStyleDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value,
                                                       style="|" if "\n" in value else None))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python deploy/render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    print(yaml.dump_all(render(argv[0]), Dumper=_BlockStyleDumper, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
