"""deploy/: the Dockerfile and the Kubernetes manifests, rendered and validated offline and checked against the code.

The overlays are rendered by the real kustomize, `kubectl kustomize` (Debian's kubectl package; .ci/run installs it
where it is missing, and these tests skip with the reason where it is absent or its kustomize is too old to render
them). Every built-in object is validated against the Kubernetes API schemas bundled with kubernetes-validate (the
newest release and 1.30, the oldest supported), and the manifests are cross-checked with the server: container args
parse with the real `glmserve serve` parser, probe ports and health service names match the server's, the HPA's
metrics are gauges the server exports, the grace period covers preStop plus the drain.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = {"cpu-demo": "glmserve-demo", "gpu": "glmserve"}    # overlay -> namespace
GRPC_PORT, HTTP_PORT, METRICS_PORT = 50051, 8000, 9090
CACHE_ENV = ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx")
# The newest schemas kubernetes-validate bundles, and the oldest release deploy/README.md supports.
K8S_VERSIONS = (kubernetes_validate.utils.latest_version(), "1.30")


# kubectl 1.21 and newer embed kustomize v4+, the first to render `patches: - path:` entries as the overlays use them.
MIN_KUSTOMIZE = (4, 0)


@functools.lru_cache(maxsize=None)
def kustomize_unusable() -> str | None:
    """Why `kubectl kustomize` cannot render the overlays here, or None when it can."""
    if shutil.which("kubectl") is None:
        return ("kubectl is not installed: the overlays are rendered with `kubectl kustomize` "
                "(kubectl 1.21 or newer; .ci/run tries `apt-get install kubectl` where it is missing)")
    result = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        return f"`kubectl version --client` failed: {result.stderr.strip()[:300]}"
    info = json.loads(result.stdout)
    kustomize = re.match(r"v?(\d+)\.(\d+)", info.get("kustomizeVersion", ""))
    client = info.get("clientVersion", {})
    if kustomize:
        version = (int(kustomize.group(1)), int(kustomize.group(2)))
    else:   # kubectl before 1.24 does not report its kustomize; 1.21-1.23 embed v4
        minor = re.match(r"\d*", client.get("minor", "")).group(0)
        version = MIN_KUSTOMIZE if client.get("major") == "1" and int(minor or 0) >= 21 else (0, 0)
    if version < MIN_KUSTOMIZE:
        return (f"kubectl {client.get('gitVersion', '?')} embeds kustomize "
                f"{info.get('kustomizeVersion', 'older than v4')}, which cannot render these overlays (needs "
                f"v{MIN_KUSTOMIZE[0]}+, kubectl 1.21+)")
    return None


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` prints (skips where it cannot run here)."""
    reason = kustomize_unusable()
    if reason:
        pytest.skip(reason)
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


# ---- helpers: rendered objects ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request):
    return request.param, render(K8S / "overlays" / request.param)


def find(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(objects):
    pod = find(objects, "Deployment", "glmserve")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "glmserve")


def container_env(objects, container) -> dict[str, str | None]:
    """The environment the kubelet expands $(VAR) from; None for values it only knows at run time (secrets...)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, "only ConfigMaps feed the args"
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def expand(text: str, env: dict[str, str | None]) -> str:
    """Kubernetes $(VAR) expansion: $$ escapes, an unknown variable stays as written."""
    def sub(match):
        if match.group(0) == "$$":
            return "$"
        value = env.get(match.group(1))
        assert value is not None or match.group(1) not in env, f"$({match.group(1)}) is not a plain value"
        return match.group(0) if value is None else value
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def server_args(objects) -> list[str]:
    container = server_container(objects)
    env = container_env(objects, container)
    return [expand(arg, env) for arg in container["args"]]


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in an argument list (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def probes(container):
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


# ---- helpers: the code the manifests must agree with -----------------------------------------------------------
def serve_parser_or_skip():
    from glmserve.engine.entrypoints.cli.main import build_parser
    parser = build_parser()
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    if "--metrics-port" not in help_text.getvalue():
        pytest.skip("`glmserve serve` does not define its flags yet (engine/serve_command.py is a placeholder)")
    return parser


def parse_serve_args(args: list[str]):
    parser = serve_parser_or_skip()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(["serve", *args])
    except SystemExit:
        pytest.fail(f"`glmserve serve {' '.join(args)}` is rejected by the real parser: {err.getvalue().strip()}")


def generation_service_name() -> str:
    try:
        from glmserve.engine.entrypoints.grpc.server import SERVICE_NAME
        return SERVICE_NAME
    except (ImportError, AttributeError):
        pass
    try:
        from glmserve.proto import generation_pb2
        return generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
    except (ImportError, KeyError):
        pytest.skip("neither glmserve.engine.entrypoints.grpc.server.SERVICE_NAME nor the generated proto descriptor exists yet")


def exported_metrics() -> dict[str, str]:
    """name -> type of the metrics a glmserve server exports: the families in a fresh ServerMetrics registry (or,
    failing that, the prometheus_client collectors defined at module level in glmserve.engine.entrypoints.metrics)."""
    try:
        metrics = importlib.import_module("glmserve.engine.entrypoints.metrics")
    except ImportError as exc:
        pytest.skip(f"glmserve.engine.entrypoints.metrics is not importable yet ({exc})")
    if hasattr(metrics, "ServerMetrics"):
        families = list(metrics.ServerMetrics().registry.collect())
    else:
        from prometheus_client.metrics import MetricWrapperBase
        families = [family for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)
                    for family in value.collect()]
    return {family.name: family.type for family in families}


# ---- schema validation -----------------------------------------------------------------------------------------
def check_service_monitor(obj):
    """The fields the ServiceMonitor CRD requires or that this setup relies on (no CRD schema offline)."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["metadata"]["name"]
    assert obj["spec"]["selector"].get("matchLabels") or obj["spec"]["selector"].get("matchExpressions")
    assert obj["spec"]["endpoints"], "a ServiceMonitor without endpoints scrapes nothing"
    for endpoint in obj["spec"]["endpoints"]:
        assert isinstance(endpoint.get("port"), str), "scrape a named Service port"
        assert endpoint.get("path", "/metrics").startswith("/")
        seconds = {k: int(re.fullmatch(r"(\d+)s", endpoint[k]).group(1)) for k in ("interval", "scrapeTimeout")}
        assert seconds["scrapeTimeout"] <= seconds["interval"]


def validate_all(objects):
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            check_service_monitor(obj)
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)


def test_overlay_objects_are_valid_kubernetes(overlay):
    name, objects = overlay
    validate_all(objects)
    expected = {"ServiceAccount", "ConfigMap", "Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget",
                "HorizontalPodAutoscaler"} | ({"PersistentVolumeClaim"} if name == "gpu" else set())
    assert {o["kind"] for o in objects} == expected
    assert {o["metadata"]["namespace"] for o in objects} == {OVERLAYS[name]}
    assert len({(o["kind"], o["metadata"]["name"]) for o in objects}) == len(objects)


def test_monitoring_objects_are_valid_kubernetes():
    validate_all(render(K8S / "monitoring"))


# ---- wiring: selectors, ports, names ---------------------------------------------------------------------------
def test_selectors_reach_the_server_pods(overlay):
    _, objects = overlay
    deployment = find(objects, "Deployment", "glmserve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], pod_labels)
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items(), service["metadata"]["name"]
    assert selects(find(objects, "PodDisruptionBudget")["spec"]["selector"], pod_labels)
    for constraint in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert selects(constraint["labelSelector"], pod_labels)
    target = find(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "glmserve")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    assert find(objects, "ServiceAccount", pod["serviceAccountName"])


def test_services_expose_named_ports_and_one_is_headless(overlay):
    _, objects = overlay
    container_ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert container_ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    assert services["glmserve-headless"]["spec"]["clusterIP"] == "None"
    assert services["glmserve"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    for service in services.values():
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, "target a named container port"
            assert port["port"] == container_ports[port["targetPort"]]
            if port["name"] == "grpc":
                assert port["appProtocol"] == "grpc"
    # The ServiceMonitor matches both Services by label; only one of them may carry the metrics port, or every pod
    # would be scraped twice.
    monitor = find(objects, "ServiceMonitor")
    for endpoint in monitor["spec"]["endpoints"]:
        scraped = [s for s in services.values() if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
                   and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
        assert [s["metadata"]["name"] for s in scraped] == ["glmserve"]


def test_container_args_are_real_serve_flags(overlay):
    _, objects = overlay
    args = server_args(objects)
    assert not [a for a in args if "$(" in a], "every $(VAR) in the args must come from the ConfigMap"
    assert all(a.startswith("--") for a in args), "one --flag=value per item"
    parse_serve_args(args)


def test_container_ports_and_probes_match_the_server_flags(overlay):
    _, objects = overlay
    args, container = server_args(objects), server_container(objects)
    assert flag(args, "--host") == "0.0.0.0"
    assert int(flag(args, "--port")) == GRPC_PORT and int(flag(args, "--metrics-port")) == METRICS_PORT
    assert int(flag(args, "--http-port")) == HTTP_PORT
    for kind, probe in probes(container).items():
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{kind} is a native gRPC probe"
        assert probe["grpc"]["port"] == GRPC_PORT, kind


def test_health_service_names_match_the_server(overlay):
    _, objects = overlay
    container = server_container(objects)
    assert container["readinessProbe"]["grpc"]["service"] == generation_service_name()
    # Startup and liveness ask for the overall health: "" (or no service, which means "").
    assert container["startupProbe"]["grpc"].get("service", "") == ""
    assert container["livenessProbe"]["grpc"].get("service", "") == ""


def test_grace_period_covers_prestop_and_drain(overlay):
    _, objects = overlay
    args, container = server_args(objects), server_container(objects)
    pod = find(objects, "Deployment", "glmserve")["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", "preStop only waits for endpoints to update"
        sleep = int(command[-1])
    drain = float(flag(args, "--drain-timeout"))
    assert 0 < sleep and 0 < drain
    grace = pod["terminationGracePeriodSeconds"]
    assert sleep + drain < grace, f"preStop {sleep} s + drain {drain} s must end before SIGKILL at {grace} s"


def test_startup_probe_allows_a_model_load(overlay):
    name, objects = overlay
    deployment = find(objects, "Deployment", "glmserve")
    startup = server_container(objects)["startupProbe"]
    window = startup["failureThreshold"] * startup["periodSeconds"]
    assert window >= (600 if name == "gpu" else 120)
    # A rollout waits for the new pod's startup; the default progress deadline is 600 s.
    assert deployment["spec"].get("progressDeadlineSeconds", 600) > window


# ---- security and resources ------------------------------------------------------------------------------------
def dockerfile_user() -> int:
    stage = final_stage(dockerfile_instructions())
    return int(stage_values(stage, "USER")[-1].split(":")[0])


def test_pod_runs_non_root_with_a_read_only_root(overlay):
    _, objects = overlay
    pod = find(objects, "Deployment", "glmserve")["spec"]["template"]["spec"]
    container = server_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_user() != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"] and not security.get("privileged")

    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m["mountPath"] for m in container["volumeMounts"]
                if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
    assert "/tmp" in writable
    env = container_env(objects, container)
    for var in CACHE_ENV:     # every cache the runtime writes must land on a writable volume
        assert any(env[var] == p or env[var].startswith(p + "/") for p in writable), var
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_resources_and_devices(overlay):
    name, objects = overlay
    args, container = server_args(objects), server_container(objects)
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    gpus = resources["limits"].get("nvidia.com/gpu")
    if name == "gpu":
        assert flag(args, "--device") == "cuda"
        assert gpus == resources["requests"]["nvidia.com/gpu"] >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in
                   find(objects, "Deployment")["spec"]["template"]["spec"]["tolerations"])
    else:
        assert flag(args, "--device") == "cpu" and gpus is None


def test_api_key_comes_from_a_secret_never_the_args(overlay):
    _, objects = overlay
    container = server_container(objects)
    key = next(v for v in container["env"] if v["name"] == "GLMSERVE_API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True
    assert not any("GLMSERVE_API_KEY" in a or "--api-key" in a for a in container["args"])


# ---- the model -------------------------------------------------------------------------------------------------
def test_model_source_exists_in_the_pod(overlay):
    from glmserve.engine.config.model_config import MODEL_PRESETS
    name, objects = overlay
    args, container = server_args(objects), server_container(objects)
    model, max_len = flag(args, "--model"), int(flag(args, "--max-model-len"))
    if name == "cpu-demo":
        assert model == "glm-tiny" and max_len <= MODEL_PRESETS[model].seq_length
        assert not any("persistentVolumeClaim" in v
                       for v in find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"])
        return
    assert max_len <= MODEL_PRESETS["chatglm3-6b-32k"].seq_length
    volumes = {v["name"]: v for v in find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in container["volumeMounts"] if model.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True and find(objects, "PersistentVolumeClaim", claim["claimName"])


# ---- autoscaling -----------------------------------------------------------------------------------------------
def adapter_rules():
    configmap = find(render(K8S / "monitoring"), "ConfigMap")
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def adapter_exposes(metric: str) -> bool:
    """Whether a prometheus-adapter rule discovers the series and publishes it under the same name, per pod."""
    for rule in adapter_rules():
        series = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"]).group(1)
        if not re.fullmatch(series, metric):
            continue
        name = rule.get("name", {})
        published = re.sub(name.get("matches", "^(.*)$"), name.get("as", "${1}").replace("${1}", r"\1"), metric)
        overrides = rule["resources"]["overrides"]
        if published == metric and overrides.get("pod") == {"resource": "pod"} and \
                overrides.get("namespace") == {"resource": "namespace"}:
            return True
    return False


def hpa_metrics(objects) -> dict[str, float]:
    hpa = find(objects, "HorizontalPodAutoscaler")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    out = {}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        out[metric["pods"]["metric"]["name"]] = float(metric["pods"]["target"]["averageValue"])
    return out


def test_hpa_scales_on_the_queue_through_the_adapter(overlay):
    _, objects = overlay
    metrics = hpa_metrics(objects)
    assert "glmserve_num_requests_waiting" in metrics
    for metric in metrics:
        assert adapter_exposes(metric), f"no prometheus-adapter rule publishes {metric}"
    # The running-requests target must be reachable: below the batch size the server is configured with.
    running = metrics.get("glmserve_num_requests_running")
    if running is not None:
        assert running < int(flag(server_args(objects), "--max-num-seqs"))


def test_hpa_metrics_are_gauges_the_server_exports(overlay):
    _, objects = overlay
    exported = exported_metrics()
    for metric in hpa_metrics(objects):
        assert exported.get(metric) == "gauge", f"the server exports no gauge {metric} (it has {sorted(exported)})"


# ---- behind an inference gateway (components/gateway, overlays/gateway) -----------------------------------------
# The InferencePool CRD (Gateway API Inference Extension, GA v1) for offline validation: in $GLMSERVE_K8S_SCHEMAS
# (a folder), else ../shared/k8s beside the repository (see its README there).
INFERENCE_POOL_CRD = (Path(os.environ.get("GLMSERVE_K8S_SCHEMAS") or REPO.parent / "shared" / "k8s")
                      / "inference.networking.k8s.io_inferencepools.yaml")
GATEWAY_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service", "ServiceMonitor",
                 "PodDisruptionBudget", "HorizontalPodAutoscaler", "InferencePool"}


@pytest.fixture(scope="module")
def gateway():
    return render(K8S / "overlays" / "gateway")


def inference_pool_schema() -> dict:
    if not INFERENCE_POOL_CRD.is_file():
        pytest.skip(f"the InferencePool CRD is not at {INFERENCE_POOL_CRD} ($GLMSERVE_K8S_SCHEMAS, else ../shared/k8s "
                    "beside the repository): the pool cannot be validated against its schema offline")
    crd = yaml.safe_load(INFERENCE_POOL_CRD.read_text(encoding="utf-8"))
    assert crd["spec"]["group"] == "inference.networking.k8s.io" and crd["spec"]["names"]["kind"] == "InferencePool"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    return version["schema"]["openAPIV3Schema"]


def validate_inference_pool(pool: dict) -> None:
    """The CRD's OpenAPI schema, then the two CEL rules it carries (jsonschema does not run CEL)."""
    import jsonschema
    jsonschema.validate(pool, inference_pool_schema())
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers)), "port number must be unique"
    picker = pool["spec"].get("endpointPickerRef")
    if picker is not None and picker.get("kind", "Service") == "Service":
        assert "port" in picker, "port is required when kind is 'Service' or unspecified"


def test_inference_pool_is_valid_against_its_crd(gateway):
    import jsonschema
    pool = find(gateway, "InferencePool", "glmserve")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    validate_inference_pool(pool)
    # The schema is not a rubber stamp: a pool without target ports, or with a picker port out of range, fails.
    broken = json.loads(json.dumps(pool))
    del broken["spec"]["targetPorts"]
    with pytest.raises(jsonschema.ValidationError):
        validate_inference_pool(broken)
    broken = json.loads(json.dumps(pool))
    broken["spec"]["endpointPickerRef"]["port"]["number"] = 70000
    with pytest.raises(jsonschema.ValidationError):
        validate_inference_pool(broken)


def test_gateway_overlay_objects_are_valid_kubernetes(gateway):
    validate_all([o for o in gateway if o["kind"] != "InferencePool"])
    assert {o["kind"] for o in gateway} == GATEWAY_KINDS
    assert {o["metadata"]["namespace"] for o in gateway} == {OVERLAYS["cpu-demo"]}
    binding = find(gateway, "RoleBinding", "glmserve-epp")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "glmserve-epp",
                                    "namespace": OVERLAYS["cpu-demo"]}]
    assert find(gateway, "Role", binding["roleRef"]["name"])


def test_pool_selects_the_server_pods_on_their_http_port(gateway):
    pool = find(gateway, "InferencePool", "glmserve")["spec"]
    server = find(gateway, "Deployment", "glmserve")
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    assert selects(pool["selector"], pod_labels)
    epp_labels = find(gateway, "Deployment", "glmserve-epp")["spec"]["template"]["metadata"]["labels"]
    assert not selects(pool["selector"], epp_labels), "the picker is not a model server"
    container_ports = {p["name"]: p["containerPort"] for p in server_container(gateway)["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [container_ports["http"]]
    assert int(flag(server_args(gateway), "--http-port")) == container_ports["http"] == HTTP_PORT
    assert pool.get("appProtocol", "http") == "http"   # uvicorn serves HTTP/1.1
    # The picker the pool names: a Service on the port the pool gives, reaching the picker's gRPC port.
    picker = pool["endpointPickerRef"]
    service = find(gateway, "Service", picker["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == picker["port"]["number"]]
    epp = find(gateway, "Deployment", "glmserve-epp")["spec"]["template"]["spec"]["containers"][0]
    epp_ports = {p["name"]: p["containerPort"] for p in epp["ports"]}
    assert selects({"matchLabels": service["spec"]["selector"]}, epp_labels)
    assert epp_ports[port["targetPort"]] == int(flag(epp["args"], "--grpc-port"))


def epp_flags(objects) -> dict[str, str]:
    container = find(objects, "Deployment", "glmserve-epp")["spec"]["template"]["spec"]["containers"][0]
    return {arg[2:].split("=", 1)[0]: arg.split("=", 1)[1] for arg in container["args"]}


def test_endpoint_picker_reads_glmserve_metrics(gateway):
    """The picker's metric flags name what glmserve exports, with the types the model-server protocol asks for:
    gauges for the queue, the running requests and the KV-cache usage, an info metric whose labels carry the block
    size and number of KV blocks; it scrapes the server's metrics port, and picks for this pool."""
    flags = epp_flags(gateway)
    exported = exported_metrics()
    for name in ("total-queued-requests-metric", "total-running-requests-metric",
                 "kv-cache-usage-percentage-metric"):
        assert exported.get(flags[name]) == "gauge", f"--{name}={flags[name]} is not a gauge glmserve exports"
    assert exported.get(flags["lora-info-metric"]) == "gauge", "the LoRA info metric the picker reads"
    assert int(flags["model-server-metrics-port"]) == int(flag(server_args(gateway), "--metrics-port"))
    assert flags["model-server-metrics-path"] == "/metrics"
    assert flags["pool-name"] == find(gateway, "InferencePool")["metadata"]["name"]
    # The cache info: the exposition's sample name, with the protocol's labels.
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client import generate_latest
    from glmserve.engine.entrypoints.metrics import ServerMetrics
    from glmserve.engine.runtime.engine_info import EngineInfo, EngineStats
    metrics = ServerMetrics()
    metrics.describe_engine(EngineInfo("m", "t", 4096, 2009, 16, 1024, "float32", "cpu", True),
                            EngineStats(1024, 1024, 0, 0, 0, 0, 0, 0.0))
    samples = {s.name: s for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
               for s in f.samples}
    info = samples[flags["cache-info-metric"]]
    assert info.value == 1.0 and (info.labels["block_size"], info.labels["num_gpu_blocks"]) == ("16", "1024")


def test_server_readiness_goes_through_the_http_listener(gateway):
    container = server_container(gateway)
    ready = container["readinessProbe"]
    assert set(ready) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"httpGet"}
    assert ready["httpGet"]["path"] == "/health" and ready["httpGet"]["port"] == HTTP_PORT
    # Startup and liveness stay the base's gRPC probes; the grace period still covers the drain.
    assert container["startupProbe"]["grpc"]["port"] == container["livenessProbe"]["grpc"]["port"] == GRPC_PORT
    parse_serve_args(server_args(gateway))
    from glmserve.engine.entrypoints.http.observer import OPEN_ROUTES
    assert ready["httpGet"]["path"] in OPEN_ROUTES, "probes carry no API key"


# ---- the Dockerfile --------------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def final_stage(instructions):
    start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[start:]


def stage_values(stage, keyword):
    return [rest for k, rest in stage if k == keyword]


def copy_sources(rest: str) -> tuple[list[str], bool]:
    """The source paths of a COPY/ADD and whether they come from the build context (no --from)."""
    if rest.startswith("["):
        words = json.loads(rest)
    else:
        words = rest.split()
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], not any(f.startswith("--from=") for f in flags)


def setup_package_dirs() -> dict[str, str]:
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TOP_LEVEL" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no TOP_LEVEL")


def test_dockerfile_runs_glmserve_serve_as_non_root():
    stage = final_stage(dockerfile_instructions())
    entrypoint = stage_values(stage, "ENTRYPOINT")[-1]
    assert entrypoint.startswith("["), "exec form: the server must be PID 1 to receive SIGTERM (no /bin/sh -c)"
    argv = json.loads(entrypoint)
    assert posixpath.basename(argv[0]) == "glmserve" and argv[1:] == ["serve"]
    user = stage_values(stage, "USER")[-1]
    assert re.fullmatch(r"\d+(:\d+)?", user), "a numeric USER, so that runAsNonRoot can verify it"
    assert int(user.split(":")[0]) != 0
    exposed = {int(p.split("/")[0]) for rest in stage_values(stage, "EXPOSE") for p in rest.split()}
    assert {GRPC_PORT, HTTP_PORT, METRICS_PORT} <= exposed


def test_dockerfile_default_cmd_is_a_valid_serve_command():
    cmd = json.loads(stage_values(final_stage(dockerfile_instructions()), "CMD")[-1])
    assert flag(cmd, "--model") == "glm-tiny", "the image serves the embedded model without a volume"
    assert flag(cmd, "--host") == "0.0.0.0", "the server's own default is loopback: a container must say 0.0.0.0"
    assert int(flag(cmd, "--port")) == GRPC_PORT and int(flag(cmd, "--metrics-port")) == METRICS_PORT
    assert int(flag(cmd, "--http-port")) == HTTP_PORT
    parse_serve_args(cmd)


def test_dockerfile_installs_the_package_without_weights():
    instructions = dockerfile_instructions()
    copied = []
    for keyword, rest in instructions:
        if keyword in ("COPY", "ADD"):
            sources, from_context = copy_sources(rest)
            assert not any(s.endswith(WEIGHT_SUFFIXES) or "*" in s for s in sources), rest
            if from_context:
                copied += [s.rstrip("/") for s in sources]
        if keyword == "RUN":
            assert not re.search(r"huggingface-cli|hf_hub_download|snapshot_download|git lfs|\.safetensors", rest)
    # Every folder setup.py installs, and the packaging files, reach the build stage.
    assert set(setup_package_dirs().values()) | {"setup.py", "pyproject.toml", "README.md"} <= set(copied)
    assert any(k == "RUN" and re.search(r"pip install( --\S+)* \.(\s|$)", rest) for k, rest in instructions)


def setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """install_requires and extras_require of setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    named = {n.targets[0].id: n.value for n in tree.body
             if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}

    def requirements(node: ast.expr) -> list[str]:   # [...] + GRPC + HTTP: lists and names of lists, added
        if isinstance(node, ast.BinOp):
            return requirements(node.left) + requirements(node.right)
        return ast.literal_eval(named[node.id] if isinstance(node, ast.Name) else node)
    return requirements(keywords["install_requires"]), ast.literal_eval(keywords["extras_require"])


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_cpu_image_gets_no_triton():
    """The CPU image is lean: glmserve does not require triton (the CPU never runs it; CUDA builds of torch bring
    their own, so the GPU image keeps it), and no RUN of the Dockerfile installs it. The test extra keeps it for the
    interpreter tests. (`make image-check` looks inside the built image too.)"""
    install, extras = setup_requirements()
    assert "triton" not in map(requirement_name, install)
    assert "triton" in map(requirement_name, extras["test"])
    for keyword, rest in dockerfile_instructions():
        if keyword == "RUN":
            for command in re.split(r"&&|;", rest):
                assert not ("pip install" in command and "triton" in command), rest
    # xgrammar requires triton on Linux x86_64 (for its GPU mask kernel only): a CPU build takes it out again.
    if "xgrammar" in map(requirement_name, install):
        text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
        assert re.search(r"torch\.version\.cuda is not None\)\"; then pip uninstall -y -q triton", text)


def test_dockerfile_torch_range_matches_setup_py():
    install, _ = setup_requirements()
    torch_range = next(r for r in install if requirement_name(r) == "torch").removeprefix("torch").replace(" ", "")
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    default = re.search(r'^ARG TORCH_VERSION="([^"]+)"', text, re.M).group(1)
    assert default == torch_range
    assert re.findall(r"setup\.py allows (\S+?)\)", text) == [torch_range]


def load_pod_to_docker():
    spec = importlib.util.spec_from_file_location("glmserve_pod_to_docker", DEPLOY / "pod_to_docker.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_image_check_runs_the_container_as_the_manifests_do():
    """deploy/pod_to_docker.py (for `make image-check`) translates the cpu-demo pod into `docker run` flags: the same
    args, a non-root numeric user, a read-only root with a writable volume for each emptyDir, /dev/shm sized,
    capabilities dropped, no privilege escalation, the CPU and memory limits, ports on loopback only."""
    pod_to_docker = load_pod_to_docker()
    objects = render(K8S / "overlays" / "cpu-demo")
    spec = pod_to_docker.run_spec(objects)
    flags = pod_to_docker.docker_run_flags(spec)
    pairs = list(zip(flags, flags[1:]))
    container = server_container(objects)
    pod = find(objects, "Deployment", "glmserve")["spec"]["template"]["spec"]
    assert spec.args == server_args(objects)
    assert ("--user", f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}") in pairs
    assert spec.user.split(":")[0] == str(dockerfile_user()) != "0"
    assert "--read-only" in flags and ("--cap-drop", "ALL") in pairs
    assert ("--security-opt", "no-new-privileges") in pairs
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        if mount["mountPath"] == "/dev/shm":
            assert ("--shm-size", str(2 ** 30)) in pairs and volumes[mount["name"]]["emptyDir"]["sizeLimit"] == "1Gi"
        else:
            assert ("--mount", f"type=volume,destination={mount['mountPath']}") in pairs
    limits = container["resources"]["limits"]
    assert ("--cpus", limits["cpu"]) in pairs and limits["memory"] == "4Gi" and ("--memory", str(4 * 2 ** 30)) in pairs
    env = dict(value.split("=", 1) for flag, value in pairs if flag == "--env")
    for var in CACHE_ENV:
        assert env[var] == container_env(objects, container)[var]
    assert env["OMP_NUM_THREADS"] == limits["cpu"] and "GLMSERVE_API_KEY" not in env
    published = [value for flag, value in pairs if flag == "--publish"]
    assert sorted(published) == sorted(f"127.0.0.1::{p}" for p in (GRPC_PORT, HTTP_PORT, METRICS_PORT))
    assert pod_to_docker.parse_quantity("500m") == 0.5 and pod_to_docker.parse_quantity("2Gi") == 2 * 2 ** 30


# ---- the build context -----------------------------------------------------------------------------------------
def dockerignore_rules(path: Path = DEPLOY / "Dockerfile.dockerignore"):
    rules = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").lstrip("/"))
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def dockerignored(path: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_build_context_holds_the_package_and_no_weights():
    rules = dockerignore_rules()
    for name in ("setup.py", "pyproject.toml", "README.md", "engine/text/assets/tiny_tokenizer.model"):
        assert not dockerignored(name, rules), name
    for folder in setup_package_dirs().values():
        for root, dirs, files in os.walk(REPO / folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for file in files:
                relative = (Path(root) / file).relative_to(REPO).as_posix()
                expected = file.endswith(WEIGHT_SUFFIXES + (".pyc",))
                assert dockerignored(relative, rules) == expected, relative
    for name in ("models/chatglm3-6b-32k/model-00001-of-00007.safetensors", "engine/x.bin", "ckpt/model.pt",
                 "tests/test_deploy.py", "deploy/Dockerfile", ".git/config", "engine/__pycache__/cli.pyc",
                 "glmserve.egg-info/PKG-INFO"):
        assert dockerignored(name, rules), name


# ---- deploy/README.md ------------------------------------------------------------------------------------------
README = DEPLOY / "README.md"


def test_readme_service_config_balances_the_generation_service():
    block = re.search(r"```json\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    config = json.loads(block)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    method = config["methodConfig"][0]
    assert method["name"] == [{"service": generation_service_name()}]
    import grpc
    assert {code for code in method["retryPolicy"]["retryableStatusCodes"]} <= {c.name for c in grpc.StatusCode}


def test_readme_names_exported_metrics_and_existing_paths():
    text = README.read_text(encoding="utf-8")
    exported = exported_metrics()
    for name in set(re.findall(r"glmserve_[a-z0-9_]+", text)):
        family = re.sub(r"_(total|bucket|sum|count|created)$", "", name)
        if family not in exported and name.endswith("_info"):   # an info metric's sample: FAMILY_info
            family = name[:-len("_info")]
        assert family in exported, f"deploy/README.md names {name}, which the server does not export"
    for path in set(re.findall(r"(?<![\w/.])deploy/[\w./-]+\w", text)):
        assert (REPO / path).exists(), path
