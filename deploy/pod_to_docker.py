"""The glmserve pod of a Kubernetes overlay as `docker run` flags: what `make image-check` runs the image with.

``run_spec`` reads the server container of the rendered overlay (`kubectl kustomize`): its args with $(VAR)
expanded from the ConfigMap and env, its plain env values (a resourceFieldRef such as OMP_NUM_THREADS from
limits.cpu is resolved; values from secrets are left out, as an optional secret that does not exist), the pod's
runAsUser/runAsGroup/fsGroup, the container's read-only root and its emptyDir mounts, dropped capabilities,
allowPrivilegeEscalation, its CPU and memory limits and ports. ``docker_run_flags`` turns that into flags.
"""
from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent / "kubernetes"
SIZE_UNITS = {"": 1, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 10 ** 3, "M": 10 ** 6,
              "G": 10 ** 9}


class ManifestError(RuntimeError):
    """The overlay cannot be rendered, or asks for something docker cannot give here."""


def render_overlay(overlay: str) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                            text=True, timeout=120)
    if result.returncode != 0:
        raise ManifestError(f"kubectl kustomize failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity ("2", "500m", "4Gi") as a number (CPU in cores, memory in bytes)."""
    match = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G)?", str(text))
    if not match:
        raise ValueError(f"unsupported quantity {text!r}")
    number, unit = float(match.group(1)), match.group(2) or ""
    return number / 1000 if unit == "m" else number * SIZE_UNITS[unit]


@dataclass
class RunSpec:
    """What the kubelet would run, in docker's terms."""

    args: list[str]
    env: dict[str, str]
    user: str                                  # uid:gid
    group_add: list[int]
    read_only: bool
    writable: list[str]                        # emptyDir mounts (disk-backed volumes)
    shm_bytes: int | None                      # the Memory-medium emptyDir on /dev/shm
    cap_drop: list[str]
    no_new_privileges: bool
    cpus: float | None
    memory_bytes: int | None
    ports: dict[str, int]                      # name -> containerPort
    grace_period_s: int
    ignored_env: list[str] = field(default_factory=list)   # from secrets (optional ones stay unset)


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: $$ escapes, an unknown variable stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def run_spec(objects: list[dict]) -> RunSpec:
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "glmserve")
    limits = container.get("resources", {}).get("limits", {})
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)["data"])
    ignored = []
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
        elif "resourceFieldRef" in var["valueFrom"]:      # e.g. OMP_NUM_THREADS from limits.cpu (rounded up)
            ref = var["valueFrom"]["resourceFieldRef"]
            amount = parse_quantity(limits[ref["resource"].split(".", 1)[1]])
            env[var["name"]] = str(math.ceil(amount / parse_quantity(ref.get("divisor", "1"))))
        else:
            ignored.append(var["name"])
    pod_security, security = pod.get("securityContext", {}), container.get("securityContext", {})
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    writable, shm = [], None
    for mount in container.get("volumeMounts", []):
        empty_dir = volumes[mount["name"]].get("emptyDir")
        if empty_dir is None:
            raise ManifestError(f"volume {mount['name']} is not an emptyDir: this check cannot provide it")
        if mount["mountPath"] == "/dev/shm":
            shm = int(parse_quantity(empty_dir.get("sizeLimit", "64Mi")))
        else:
            writable.append(mount["mountPath"])
    return RunSpec(
        args=[_expand(a, env) for a in container.get("args", [])],
        env=dict(env),
        user=f"{pod_security['runAsUser']}:{pod_security.get('runAsGroup', pod_security['runAsUser'])}",
        group_add=[pod_security["fsGroup"]] if "fsGroup" in pod_security else [],
        read_only=bool(security.get("readOnlyRootFilesystem")),
        writable=writable, shm_bytes=shm,
        cap_drop=security.get("capabilities", {}).get("drop", []),
        no_new_privileges=security.get("allowPrivilegeEscalation") is False,
        cpus=parse_quantity(limits["cpu"]) if "cpu" in limits else None,
        memory_bytes=int(parse_quantity(limits["memory"])) if "memory" in limits else None,
        ports={p["name"]: p["containerPort"] for p in container.get("ports", [])},
        grace_period_s=int(pod.get("terminationGracePeriodSeconds", 30)),
        ignored_env=ignored)


def docker_run_flags(spec: RunSpec) -> list[str]:
    """`docker run` flags for ``spec`` (before the image name; the args go after it). Ports are published on
    loopback only, each on a free host port."""
    flags = ["--user", spec.user]
    for gid in spec.group_add:
        flags += ["--group-add", str(gid)]
    if spec.read_only:
        flags.append("--read-only")
    for path in spec.writable:   # an anonymous volume starts with the image folder's content and owner, as emptyDir
        flags += ["--mount", f"type=volume,destination={path}"]
    if spec.shm_bytes:
        flags += ["--shm-size", str(spec.shm_bytes)]
    for cap in spec.cap_drop:
        flags += ["--cap-drop", cap]
    if spec.no_new_privileges:
        flags += ["--security-opt", "no-new-privileges"]
    if spec.cpus:
        flags += ["--cpus", f"{spec.cpus:g}"]
    if spec.memory_bytes:
        flags += ["--memory", str(spec.memory_bytes)]
    for name, value in spec.env.items():
        flags += ["--env", f"{name}={value}"]
    for port in spec.ports.values():
        flags += ["--publish", f"127.0.0.1::{port}"]
    return flags
