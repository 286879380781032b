"""Run the glmserve image the way the Kubernetes manifests do, and check that it serves and drains.

    python deploy/image_check.py --image localhost/glmserve:image-check [--overlay cpu-demo] [--out FILE]

Called by deploy/image_check.sh (`make image-check`) once the image is built and known to docker. The container's
settings come from the overlay as `kubectl kustomize` renders it, translated to `docker run` flags by
deploy/pod_to_docker.py: the server container's args and env, the pod's user and groups, a read-only root filesystem
with a writable volume for each emptyDir mount (/dev/shm: --shm-size), all capabilities dropped, no privilege
escalation, and the CPU and memory limits. Then:

1. the image: a CPU torch, no triton, a numeric non-root user;
2. gRPC health: overall and glmserve.v1.Generation SERVING (the startup and readiness probes);
3. one Generate of 16 tokens;
4. /metrics: the tokens counted, the model info;
5. SIGTERM (as the kubelet sends it) with a stream in flight: the stream ends with all its tokens, the log has the
   drain line, the exit code is 0, before the pod's grace period.
Prints what it measured and writes it as JSON to --out. Exits 1 on the first failed check.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from pod_to_docker import ManifestError, RunSpec, docker_run_flags, render_overlay, run_spec   # beside this file

GRPC_SERVICE = "glmserve.v1.Generation"
START_TIMEOUT_S = 300
GENERATE_TOKENS = 16
DRAIN_TOKENS = 256                   # about 1.5 s on the 2-core machine: still streaming when SIGTERM lands


class CheckFailed(RuntimeError):
    """One of the checks did not hold; the message says which and what was seen."""


# ---- the checks ---------------------------------------------------------------------------------------------------
def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args[:2])} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def check_image(image: str, spec: RunSpec) -> dict:
    """The image's torch is a CPU build, triton is absent, and its USER is the manifests' non-root user."""
    probe = ("import importlib.util, json, torch; print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'triton': importlib.util.find_spec('triton') is not None}))")
    found = json.loads(docker("run", "--rm", "--entrypoint", "python", image, "-c", probe).splitlines()[-1])
    user = docker("image", "inspect", "--format", "{{.Config.User}}", image)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image))
    if found["cuda"] is not None or found["triton"]:
        raise CheckFailed(f"the CPU image has a CUDA torch or triton: {found}")
    if user.split(":")[0] != spec.user.split(":")[0] or user.split(":")[0] in ("", "0", "root"):
        raise CheckFailed(f"the image's USER {user!r} is not the manifests' runAsUser {spec.user}")
    return {**found, "user": user, "size_bytes": size}


def host_port(container: str, port: int) -> int:
    return int(docker("port", container, f"{port}/tcp").splitlines()[0].rsplit(":", 1)[1])


def wait_serving(container: str, target: str) -> float:
    from glmserve.engine.entrypoints.grpc.client import SERVING, GenerationClient
    started = time.monotonic()
    with GenerationClient(target) as client:
        while time.monotonic() - started < START_TIMEOUT_S:
            if docker("inspect", "--format", "{{.State.Running}}", container) != "true":
                raise CheckFailed("the container exited while starting; its log:\n" + logs(container))
            try:
                if client.health(timeout=2) == SERVING and client.health(GRPC_SERVICE, timeout=2) == SERVING:
                    return time.monotonic() - started
            except Exception:  # noqa: BLE001 - not listening yet is what we wait out
                pass
            time.sleep(0.5)
    raise CheckFailed(f"not SERVING within {START_TIMEOUT_S} s; the log:\n" + logs(container))


def logs(container: str) -> str:
    result = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr).strip()


def generate_once(target: str) -> dict:
    from glmserve.engine.entrypoints.grpc.client import GenerationClient, collect
    with GenerationClient(target) as client:
        started = time.monotonic()
        completion = collect(client.generate("hello from the image check", max_tokens=GENERATE_TOKENS,
                                             ignore_eos=True, temperature=0.0, timeout=60))[0]
        seconds = time.monotonic() - started
    if len(completion.token_ids) != GENERATE_TOKENS or completion.finish_reason != "length":
        raise CheckFailed(f"Generate returned {len(completion.token_ids)} tokens, finish {completion.finish_reason}")
    return {"tokens": len(completion.token_ids), "seconds": round(seconds, 3), "text": completion.text}


def read_metrics(metrics_port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    generated = samples.get(("glmserve_generation_tokens_total", ()), 0)
    models = [dict(labels) for name, labels in samples if name == "glmserve_model_info"]
    if generated < GENERATE_TOKENS or not models:
        raise CheckFailed(f"/metrics counts {generated} generated tokens and models {models}")
    return {"generation_tokens_total": generated, "model_info": models[0], "series": len(samples)}


def drain(container: str, target: str, grace_period_s: int) -> dict:
    """SIGTERM with one stream in flight: it must end with all its tokens; the server logs its drain, exits 0."""
    from glmserve.engine.entrypoints.grpc.client import GenerationClient
    first_token, outcome = threading.Event(), {}

    def stream() -> None:
        try:
            with GenerationClient(target) as client:
                tokens, finish = 0, None
                for chunk in client.generate("drain me", max_tokens=DRAIN_TOKENS, ignore_eos=True,
                                             temperature=0.0, timeout=120):
                    tokens += len(chunk.token_ids)
                    finish = chunk.finish_reason or finish
                    first_token.set()
                outcome.update(tokens=tokens, finish=finish)
        except Exception as exc:  # noqa: BLE001 - reported below as the failed check
            outcome["error"] = repr(exc)
            first_token.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    if not first_token.wait(60) or "error" in outcome:
        raise CheckFailed(f"the drain stream did not start: {outcome.get('error')}")
    started = time.monotonic()
    docker("kill", "--signal", "SIGTERM", container)
    code = int(docker("wait", container, timeout=grace_period_s + 30))
    seconds = time.monotonic() - started
    reader.join(30)
    log = logs(container)
    drained = re.search(r"glmserve: drained (\d+) in-flight requests?", log)
    if outcome.get("tokens") != DRAIN_TOKENS or outcome.get("finish") != "length":
        raise CheckFailed(f"the in-flight stream did not finish during the drain: {outcome}")
    if code != 0 or not drained or seconds >= grace_period_s:
        raise CheckFailed(f"exit code {code} after {seconds:.1f} s (grace {grace_period_s} s), drain line "
                          f"{drained.group(0) if drained else None!r}; the log:\n{log}")
    return {"exit_code": code, "seconds": round(seconds, 2), "log_line": drained.group(0),
            "drained_requests": int(drained.group(1)), "stream_tokens": outcome["tokens"]}


def run_check(image: str, overlay: str) -> dict:
    spec = run_spec(render_overlay(overlay))
    report = {"image": image, "overlay": overlay, "docker_run": docker_run_flags(spec) + [image] + spec.args,
              "image_facts": check_image(image, spec)}
    name = f"glmserve-image-check-{int(time.time())}"
    docker("run", "--detach", "--name", name, *docker_run_flags(spec), image, *spec.args)
    try:
        target = f"127.0.0.1:{host_port(name, spec.ports['grpc'])}"
        report["seconds_to_serving"] = round(wait_serving(name, target), 2)
        report["generate"] = generate_once(target)
        report["metrics"] = read_metrics(host_port(name, spec.ports["metrics"]))
        report["drain"] = drain(name, target, spec.grace_period_s)
    finally:
        docker("rm", "--force", "--volumes", name, check=False)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--overlay", default="cpu-demo")
    parser.add_argument("--build-seconds", type=float, default=None, help="recorded in the report")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        report = run_check(args.image, args.overlay)
    except (CheckFailed, ManifestError) as exc:
        print(f"image-check: FAILED: {exc}", file=sys.stderr)
        return 1
    report["build_seconds"] = args.build_seconds
    facts = report["image_facts"]
    print(f"image-check: docker run {' '.join(report['docker_run'])}")
    print(f"image-check: image {facts['size_bytes'] / 1e9:.2f} GB, torch {facts['torch']} (cuda {facts['cuda']}), "
          f"triton {'present' if facts['triton'] else 'absent'}, USER {facts['user']}")
    print(f"image-check: SERVING after {report['seconds_to_serving']} s; Generate {report['generate']['tokens']} "
          f"tokens in {report['generate']['seconds']} s; /metrics {report['metrics']['series']} series, "
          f"{report['metrics']['generation_tokens_total']:g} generated tokens, model "
          f"{report['metrics']['model_info'].get('model')}")
    print(f"image-check: SIGTERM with a stream in flight: {report['drain']['stream_tokens']} tokens streamed, "
          f"'{report['drain']['log_line']}', exit code {report['drain']['exit_code']} after "
          f"{report['drain']['seconds']} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("image-check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
