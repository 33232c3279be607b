"""deploy/: the container images and the Kubernetes manifests agree with the server they run.

Every kustomization is rendered with kustomize (the `kustomize` binary, or `kubectl kustomize`;
`make test-tools` installs one), the built-in kinds are validated against the Kubernetes OpenAPI
schemas in strict mode (kubernetes-validate), and the custom resources (PodMonitor,
PrometheusRule, ScaledObject) are checked field by field against what they refer to. The
health service names, ports and drain time are the server's own; the Dockerfiles install what
the Makefile installs; the monitoring resources are generated from their single sources.
"""

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import kubernetes_validate.utils
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import ServerProcess
from tls_certs import make_pki

from cispo.service.config import ServerConfig
from cispo.service.server import HEALTH_SERVICE_NAMES, is_loopback
from cispo.service.servicer import SERVICE_NAME

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
OVERLAYS = ("cpu", "gpu", "group", "group-fsdp")
GROUPS = ("group", "group-fsdp")
KUSTOMIZATIONS = {
    "base": K8S / "base",
    **{name: K8S / "overlays" / name for name in OVERLAYS},
    "monitoring": DEPLOY,
}
SERVER_OVERLAYS = ("base", *OVERLAYS)

# Kubernetes versions the built-in kinds must be valid for: the oldest supported (native gRPC
# probes are GA since 1.27) and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
BUILTIN_API_GROUPS = {"", "apps", "autoscaling", "batch", "policy", "networking.k8s.io", "rbac.authorization.k8s.io"}
CUSTOM_KINDS = {
    ("monitoring.coreos.com", "PodMonitor"),
    ("monitoring.coreos.com", "PrometheusRule"),
    ("keda.sh", "ScaledObject"),
    ("cert-manager.io", "Certificate"),
    ("cert-manager.io", "Issuer"),
}

GRPC_PORT = ServerConfig().port
HEALTH_PORT = 8081  # the manifests' CISPO_HEALTH_PORT (the server's default is off)
METRICS_PORT = ServerConfig().metrics_port
HTTP_PORT = 8000  # the manifests' CISPO_HTTP_PORT (the server's default is off)
DEFAULT_DRAIN_SECONDS = ServerConfig().drain_seconds


# ---------------------------------------------------------------------------------------------
# Rendering


@functools.cache
def _renderer() -> tuple[str, ...] | None:
    """`kustomize build`, else `kubectl kustomize` when its built-in kustomize is v4 or newer."""
    if shutil.which("kustomize"):
        return ("kustomize", "build")
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True).stdout
        match = re.search(r"Kustomize Version: v(\d+)\.", out)
        if match and int(match.group(1)) >= 4:
            return ("kubectl", "kustomize")
    return None


def _build(path: Path) -> list[dict]:
    renderer = _renderer()
    if renderer is None:
        pytest.fail("no kustomize: install kustomize >= 4 or kubectl >= 1.21 (`make test-tools` does)")
    proc = subprocess.run([*renderer, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(renderer)} {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _rendered(name: str) -> tuple[dict, ...]:
    return tuple(_build(KUSTOMIZATIONS[name]))


def render(name: str) -> list[dict]:
    """The resources of a kustomization (shared between tests: do not modify them)."""
    return list(_rendered(name))


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def api_group(doc: dict) -> str:
    return doc["apiVersion"].rpartition("/")[0]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def the_container(workload: dict) -> dict:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    return containers[0]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def servers(docs: list[dict]) -> list[dict]:
    """Workloads whose pods run the gRPC server (rank 0 of a group, or a one-pod group)."""
    return [w for w in workloads(docs) if pod_labels(w).get("app.kubernetes.io/component") == "server"]


def env_of(container: dict, docs: list[dict]) -> dict[str, str]:
    """The container's plain environment: ConfigMaps of envFrom, then literal env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config_map = one(docs, "ConfigMap", source["configMapRef"]["name"])
        env.update(config_map.get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def env_names(container: dict, docs: list[dict]) -> set[str]:
    return set(env_of(container, docs)) | {var["name"] for var in container.get("env", [])}


def drain_seconds(container: dict, docs: list[dict]) -> float:
    return float(env_of(container, docs).get("CISPO_DRAIN_SECONDS", DEFAULT_DRAIN_SECONDS))


def prestop_seconds(container: dict) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop hook {command}"
    return float(command[1])


def torchrun_flags(container: dict) -> dict[str, str] | None:
    """`--flag=value` arguments of a torchrun command, or None when the command is not torchrun."""
    if container.get("command") != ["torchrun"]:
        return None
    flags = {}
    for arg in container["args"]:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            flags[key] = value
    return flags


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


# ---------------------------------------------------------------------------------------------
# Rendering and schemas


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_kustomization_renders(name):
    docs = render(name)
    assert docs
    kinds = {d["kind"] for d in docs}
    if name == "monitoring":
        assert kinds == {"ConfigMap", "PrometheusRule"}
    else:
        assert {"StatefulSet", "Service", "ConfigMap", "PodMonitor", "NetworkPolicy"} <= kinds


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_builtin_kinds_pass_strict_schema_validation(name):
    for doc in render(name):
        if (api_group(doc), doc["kind"]) in CUSTOM_KINDS:
            continue  # checked field by field below
        assert api_group(doc) in BUILTIN_API_GROUPS, f"unexpected kind {doc['apiVersion']} {doc['kind']}"
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.utils.validate(doc, version, strict=True)
            except kubernetes_validate.utils.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}) at {path}: {exc.message}")


def test_names_follow_a_prefix(tmp_path):
    """References kustomize must rewrite (ConfigMaps, serviceName, the KEDA target) follow a rename."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S / "overlays" / "cpu", tmp_path)],
                "namePrefix": "team-a-",
            }
        )
    )
    docs = _build(tmp_path)
    statefulset = one(docs, "StatefulSet", "team-a-cispo")
    assert statefulset["spec"]["serviceName"] == "team-a-cispo-headless"
    issuers = {d["metadata"]["name"] for d in of_kind(docs, "Issuer")}
    for certificate in of_kind(docs, "Certificate"):
        assert certificate["spec"]["issuerRef"]["name"] in issuers
    one(docs, "Service", "team-a-cispo-headless")
    for source in the_container(statefulset)["envFrom"]:
        assert source["configMapRef"]["name"].startswith("team-a-cispo-")
    (scaled,) = of_kind(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "team-a-cispo"


# ---------------------------------------------------------------------------------------------
# The pods: probes, ports, shutdown, storage, resources


@pytest.mark.parametrize("name", SERVER_OVERLAYS)
def test_probes_name_health_services_the_server_registers(name):
    docs = render(name)
    assert servers(docs), "no serving pods"
    assert set(HEALTH_SERVICE_NAMES) == {"", SERVICE_NAME}
    for workload in servers(docs):
        container = the_container(workload)
        found = probes(container)
        assert {"readinessProbe", "livenessProbe"} <= set(found), workload["metadata"]["name"]
        # Kubelet's gRPC probes speak neither TLS nor tokens: they use the plaintext health port.
        health_port = int(env_of(container, docs)["CISPO_HEALTH_PORT"])
        assert health_port == HEALTH_PORT != GRPC_PORT
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["health"] == health_port
        for kind, probe in found.items():
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{kind}: native gRPC probe"
            assert probe["grpc"]["port"] == health_port
            assert probe["grpc"].get("service", "") in HEALTH_SERVICE_NAMES
        # Ready means the training API answers; alive means the process does.
        assert found["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
        assert found["livenessProbe"]["grpc"].get("service", "") == ""
        # Liveness tolerates the drain (health is NOT_SERVING then) without killing the pod.
        live = found["livenessProbe"]
        assert live.get("periodSeconds", 10) * live.get("failureThreshold", 3) > drain_seconds(container, docs)
    for workload in workloads(docs):
        if workload not in servers(docs):  # ranks > 0 serve no gRPC, so no gRPC probes
            assert not probes(the_container(workload)), workload["metadata"]["name"]


def test_the_server_answers_the_probes_health_checks(tmp_path):
    """Start the real server configured as the pods are (TLS, tokens, the health port) and ask
    it, as the kubelet does (plaintext, no token), for every health service a probe names."""
    services = {
        probe["grpc"].get("service", "")
        for name in SERVER_OVERLAYS
        for workload in servers(render(name))
        for probe in probes(the_container(workload)).values()
    }
    pki = make_pki(tmp_path / "tls")
    tokens = tmp_path / "tokens"
    tokens.write_text("trainer:0123456789abcdef0123\n")
    server = ServerProcess(
        "--device",
        "cpu",
        "--health-port",
        "0",
        "--tls-cert-file",
        str(pki.server_cert),
        "--tls-key-file",
        str(pki.server_key),
        "--auth-tokens-file",
        str(tokens),
        checkpoint_dir=tmp_path / "ckpt",
    )
    try:
        health_port = int(
            re.search(r"grpc\.health\.v1 \(plaintext, health only\) on [^:]+:(\d+)", server.log()).group(1)
        )
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in sorted(services):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        # The gRPC port itself does not answer plaintext.
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        assert server.terminate() == 0


@pytest.mark.parametrize("name", SERVER_OVERLAYS)
def test_ports_match_the_server(name):
    docs = render(name)
    for workload in servers(docs):
        container = the_container(workload)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == GRPC_PORT
        assert ports["metrics"] == METRICS_PORT
        env = env_of(container, docs)
        assert int(env.get("CISPO_PORT", GRPC_PORT)) == GRPC_PORT
        assert int(env.get("CISPO_METRICS_PORT", METRICS_PORT)) == METRICS_PORT
        assert ports["tinker-http"] == int(env["CISPO_HTTP_PORT"]) == HTTP_PORT
    # Every Service port reaches a named container port of the pods it selects.
    for service in of_kind(docs, "Service"):
        selected = [w for w in workloads(docs) if selects(service["spec"]["selector"], pod_labels(w))]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            expected = {"grpc": GRPC_PORT, "metrics": METRICS_PORT, "tinker-http": HTTP_PORT}[port["name"]]
            assert port["port"] == expected
            serving = [w for w in selected if w in servers(docs)]
            for workload in serving:
                named = {p["name"]: p["containerPort"] for p in the_container(workload)["ports"]}
                assert named[port["targetPort"]] == expected


@pytest.mark.parametrize("name", SERVER_OVERLAYS)
def test_grpc_service_reaches_only_serving_pods(name):
    docs = render(name)
    service = one(docs, "Service", "cispo")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    for workload in workloads(docs):
        assert selects(service["spec"]["selector"], pod_labels(workload)) == (workload in servers(docs))
    headless = one(docs, "Service", "cispo-headless")
    assert headless["spec"]["clusterIP"] == "None"
    for workload in workloads(docs):
        assert workload["spec"]["serviceName"] == "cispo-headless"


@pytest.mark.parametrize("name", SERVER_OVERLAYS)
def test_grace_period_covers_prestop_and_drain(name):
    docs = render(name)
    for workload in workloads(docs):
        container = the_container(workload)
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        pre_stop, drain = prestop_seconds(container), drain_seconds(container, docs)
        assert pre_stop > 0, f"{workload['metadata']['name']}: preStop hook"
        assert grace > pre_stop + drain
        flags = torchrun_flags(container)
        if flags is not None:
            # torchrun forwards SIGTERM and kills its worker after --shutdown-timeout.
            shutdown = float(flags["shutdown-timeout"])
            assert shutdown > drain
            assert grace >= pre_stop + shutdown


@pytest.mark.parametrize("name", SERVER_OVERLAYS)
def test_checkpoint_volume_and_resource_requests(name):
    docs = render(name)
    for workload in servers(docs):
        container = the_container(workload)
        checkpoint_dir = env_of(container, docs)["CISPO_CHECKPOINT_DIR"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == checkpoint_dir]
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        claims |= {v["name"] for v in pod_spec(workload).get("volumes", []) if "persistentVolumeClaim" in v}
        assert mount["name"] in claims, "the checkpoint directory is a persistent volume"
        assert not mount.get("readOnly", False)
        user = pod_spec(workload)["securityContext"]
        assert user["runAsNonRoot"] is True
        assert user["fsGroup"] == user["runAsGroup"], "the volume is writable by the server's group"
    for workload in workloads(docs):
        requests = the_container(workload)["resources"]["requests"]
        assert {"cpu", "memory"} <= set(requests), workload["metadata"]["name"]


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_one_pod_overlays(name):
    docs = render(name)
    (statefulset,) = workloads(docs)
    assert statefulset["spec"]["replicas"] == 1
    assert torchrun_flags(the_container(statefulset)) is None, "one pod runs cispo-server itself"
    assert "command" not in the_container(statefulset), "the image's entrypoint, cispo-server"


@pytest.mark.parametrize("name", OVERLAYS)
def test_device_and_gpu_limits(name):
    docs = render(name)
    gpu = name in ("gpu", *GROUPS)
    for workload in workloads(docs):
        container = the_container(workload)
        resources = container["resources"]
        assert env_of(container, docs)["CISPO_DEVICE"] == ("cuda" if gpu else "cpu")
        assert container["image"].endswith("-cuda" if gpu else "-cpu")
        if gpu:
            assert int(resources["limits"]["nvidia.com/gpu"]) == 1
        else:
            assert "nvidia.com/gpu" not in resources.get("limits", {})


# ---------------------------------------------------------------------------------------------
# The data-parallel group


@pytest.mark.parametrize("name", GROUPS)
def test_group_is_one_torchrun_c10d_rendezvous(name):
    docs = render(name)
    (leader,) = servers(docs)
    (worker,) = [w for w in workloads(docs) if w is not leader]
    group_size = 1 + worker["spec"]["replicas"]
    assert leader["spec"]["replicas"] == 1
    assert group_size >= 2

    leader_c, worker_c = the_container(leader), the_container(worker)
    for container in (leader_c, worker_c):
        flags = torchrun_flags(container)
        assert flags is not None
        env = env_of(container, docs)
        assert int(expand(flags["nnodes"], env)) == group_size
        assert flags["nproc-per-node"] == "1"
        assert flags["rdzv-backend"] == "c10d"
        assert container["args"][-2:] == ["-m", "cispo.service"]
        # The rendezvous store is rank 0's pod, by its name under the headless Service.
        host, _, port = expand(flags["rdzv-endpoint"], env).rpartition(":")
        assert host == f"{leader['metadata']['name']}-0.{leader['spec']['serviceName']}"
        assert int(port) in {p["containerPort"] for p in leader_c["ports"] if p["name"] == "rdzv"}
        assert "POD_NAME" in env_names(container, docs)
        assert expand(flags["local-addr"], {**env, "POD_NAME": "<pod>"}) == f"<pod>.{leader['spec']['serviceName']}"

    # Both halves run the same program with the same configuration.
    assert leader_c["image"] == worker_c["image"]
    assert leader_c["envFrom"] == worker_c["envFrom"]
    assert leader_c["resources"] == worker_c["resources"]
    assert [a.replace("is_host=1", "is_host=0") for a in leader_c["args"]] == worker_c["args"]

    # c10d ranks nodes by their sorted addresses: rank 0 must be the leader for any group size.
    domain = leader["spec"]["serviceName"]
    leader_addr = f"{leader['metadata']['name']}-0.{domain}"
    worker_addrs = [f"{worker['metadata']['name']}-{i}.{domain}" for i in range(64)]
    assert sorted([*worker_addrs, leader_addr])[0] == leader_addr

    # Rendezvous comes before readiness, so the headless Service names every rank early.
    headless = one(docs, "Service", domain)
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert selects(headless["spec"]["selector"], pod_labels(leader))
    assert selects(headless["spec"]["selector"], pod_labels(worker))

    # Workers outlive rank 0's preStop and drain: its collectives need them.
    assert prestop_seconds(worker_c) >= prestop_seconds(leader_c) + drain_seconds(leader_c, docs)
    # No autoscaler on a group: its replicas are its ranks.
    assert not of_kind(docs, "ScaledObject")


def test_fsdp_group_shares_one_read_write_many_checkpoint_volume():
    """Under --sharding fsdp every rank writes its shards of a state: all ranks mount one
    ReadWriteMany claim at the checkpoint directory they are given."""
    docs = render("group-fsdp")
    (claim,) = of_kind(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert len(workloads(docs)) == 2
    for workload in workloads(docs):
        container = the_container(workload)
        env = env_of(container, docs)
        assert env["CISPO_SHARDING"] == "fsdp"
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = volumes[mounts[env["CISPO_CHECKPOINT_DIR"]]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert env_of(the_container(servers(render("group"))[0]), render("group"))["CISPO_SHARDING"] == "replicated"


# ---------------------------------------------------------------------------------------------
# Custom resources: PodMonitor, ScaledObject


@pytest.mark.parametrize("name", SERVER_OVERLAYS)
def test_podmonitor_scrapes_the_metrics_port(name):
    docs = render(name)
    (monitor,) = of_kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    scraped = [w for w in workloads(docs) if selects(spec["selector"]["matchLabels"], pod_labels(w))]
    assert scraped == servers(docs)
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for workload in scraped:
        named = {p["name"]: p["containerPort"] for p in the_container(workload)["ports"]}
        assert named[endpoint["port"]] == METRICS_PORT
    # The alert rules and the dashboard select job="cispo".
    assert {"action": "replace", "targetLabel": "job", "replacement": "cispo"} in endpoint["relabelings"]


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_scaledobject_scales_replica_groups_on_queue_depth(name):
    docs = render(name)
    (scaled,) = of_kind(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "StatefulSet")
    statefulset = one(docs, "StatefulSet", target["name"])
    assert statefulset in servers(docs) and torchrun_flags(the_container(statefulset)) is None
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert "cispo_queue_depth" in trigger["metadata"]["query"]
    assert 'job="cispo"' in trigger["metadata"]["query"]
    assert trigger["metadata"]["serverAddress"].startswith("http")
    assert float(trigger["metadata"]["threshold"]) > 0
    # Removing a pod would discard a training state: no automatic scale-in.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["selectPolicy"] == "Disabled"


# ---------------------------------------------------------------------------------------------
# Monitoring: one source each


def _load_generator():
    path = K8S / "monitoring" / "generate_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_prometheusrule_is_generated_from_rules_yaml():
    generator = _load_generator()
    source = (DEPLOY / "prometheus" / "rules.yaml").read_text()
    checked_in = (K8S / "monitoring" / "prometheusrule.yaml").read_text()
    assert checked_in == generator.prometheus_rule(source), (
        "deploy/k8s/monitoring/prometheusrule.yaml is stale: run "
        "`python deploy/k8s/monitoring/generate_prometheusrule.py`"
    )


def test_rendered_prometheusrule_carries_the_rule_groups():
    (rule,) = of_kind(render("monitoring"), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())["groups"]
    assert rule["spec"]["groups"] == groups
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"].strip()


def test_dashboard_configmap_is_the_dashboard_json():
    (config_map,) = of_kind(render("monitoring"), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (DEPLOY / "grafana" / "cispo-dashboard.json").read_text()
    assert config_map["data"] == {"cispo-dashboard.json": source}
    assert json.loads(source)["panels"]
    assert len(source.encode()) < 1 << 20, "a ConfigMap holds at most 1 MiB"


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), " ".join(rest.split())))
    return out


def build_args(instructions) -> dict[str, str]:
    return dict(rest.split("=", 1) for ins, rest in instructions if ins == "ARG" and "=" in rest)


def pip_installs(instructions) -> list[str]:
    """The argument lists of every `pip install` in RUN steps, build args substituted."""
    args = build_args(instructions)
    installs = []
    for ins, rest in instructions:
        if ins != "RUN":
            continue
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest)
        for command in re.split(r"&&|;", rest):
            match = re.search(r"pip install (.*)", command)
            if match:
                installs.append(match.group(1).strip())
    return installs


def makefile_torch_spec() -> str:
    match = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile: TORCH_SPEC"
    return match.group(1)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_makefile_install_is_torch_then_the_project():
    """The recipe the Dockerfiles follow: torch (TORCH_SPEC) first, then the project."""
    recipe = (ROOT / "Makefile").read_text().split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    torch_at = re.search(r'pip install [^\n]*"\$\(TORCH_SPEC\)"', recipe)
    project_at = re.search(r'pip install [^\n]*"\.\[dev\]"', recipe)
    assert torch_at and project_at and torch_at.start() < project_at.start()
    assert "cispo[server,http]" in pyproject()["project"]["optional-dependencies"]["dev"]


@pytest.mark.parametrize("variant", list(DOCKERFILES))
def test_dockerfile_installs_like_the_makefile(variant):
    instructions = dockerfile(DOCKERFILES[variant])
    installs = pip_installs(instructions)
    assert len(installs) == 2, installs
    torch_install, project_install = installs
    assert torch_install.split()[-1].strip('"') == makefile_torch_spec()
    assert project_install == '".[server,http]"'
    assert "server" in pyproject()["project"]["optional-dependencies"]
    index = re.search(r"--index-url (\S+)", torch_install).group(1).strip('"')
    # CPU wheels from PyTorch's CPU index; CUDA wheels are PyPI's Linux build.
    assert index == {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://pypi.org/simple"}[variant]


@pytest.mark.parametrize("variant", list(DOCKERFILES))
def test_dockerfile_entrypoint_user_ports_and_checkpoints(variant):
    instructions = dockerfile(DOCKERFILES[variant])
    (entrypoint,) = [rest for ins, rest in instructions if ins == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["cispo-server"]
    assert "cispo-server" in pyproject()["project"]["scripts"]

    users = [rest for ins, rest in instructions if ins == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user, so runAsNonRoot can check it"
    for name in SERVER_OVERLAYS:
        for workload in workloads(render(name)):
            assert str(pod_spec(workload)["securityContext"]["runAsUser"]) == uid

    exposed = {int(p) for ins, rest in instructions if ins == "EXPOSE" for p in rest.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}

    env = dict(kv.split("=", 1) for ins, rest in instructions if ins == "ENV" for kv in rest.split())
    checkpoint_dir = env["CISPO_CHECKPOINT_DIR"]
    run = " ".join(rest for ins, rest in instructions if ins == "RUN")
    assert f"mkdir -p {checkpoint_dir}" in run and "chown -R cispo:cispo /var/lib/cispo" in run
    assert checkpoint_dir.startswith("/var/lib/cispo/")
    for name in SERVER_OVERLAYS:
        docs = render(name)
        for workload in servers(docs):
            assert env_of(the_container(workload), docs)["CISPO_CHECKPOINT_DIR"] == checkpoint_dir
    assert env["CISPO_DEVICE"] == variant
    # A container's loopback is unreachable through a published port: every address, and so
    # the server demands tokens (or CISPO_INSECURE=1).
    assert env["CISPO_HOST"] == "0.0.0.0" and "CISPO_INSECURE" not in env


@pytest.mark.parametrize("variant", list(DOCKERFILES))
def test_dockerfile_copies_every_package(variant):
    path = DOCKERFILES[variant]
    instructions = dockerfile(path)
    copied = {src for ins, rest in instructions if ins == "COPY" for src in rest.split()[:-1]}
    project = pyproject()
    assert {Path(d).parts[0] for d in project["tool"]["setuptools"]["package-dir"].values()} <= copied
    assert {"pyproject.toml", project["project"]["readme"]} <= copied
    # The build context is the repository root; the Dockerfile's own ignore file lets in
    # exactly what it copies (and keeps .venv and checkpoints out of the context).
    ignore = Path(f"{path}.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore and allowed == copied


def test_readme_install_matches_the_images():
    """The README installs through the Makefile (whose recipe the images follow) and pins the same torch."""
    text = (ROOT / "README.md").read_text()
    assert re.search(r"\bmake (install|serve)\b", text)
    for pin in re.findall(r"torch==[\w.+]+", text):
        assert pin == makefile_torch_spec()


# ---------------------------------------------------------------------------------------------
# Security: TLS and tokens from Secrets, NetworkPolicy

CLIENT_LABEL = {"cispo.dev/client": "true"}
NAMESPACE = {"kubernetes.io/metadata.name": "cispo"}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


def mounted_secret_file(workload: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in the container, from a Secret volume mounted
    as a directory (subPath mounts would miss the updates of a rotated certificate)."""
    container = the_container(workload)
    directory, _, filename = path.rpartition("/")
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == directory]
    assert "subPath" not in mount, f"{path}: a subPath mount is never updated"
    assert mount.get("readOnly") is True, path
    (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
    assert "secret" in volume, f"{path}: not from a Secret"
    items = volume["secret"].get("items")
    if items:
        (key,) = [item["key"] for item in items if item["path"] == filename]
    else:
        key = filename
    return volume["secret"]["secretName"], key


def render_with_components(tmp_path: Path, overlay: str, *components: str) -> list[dict]:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp_path)],
                "components": [os.path.relpath(K8S / "components" / c, tmp_path) for c in components],
            }
        )
    )
    return _build(tmp_path)


def check_tls_and_tokens(docs: list[dict], with_certificates: bool) -> None:
    for workload in servers(docs):
        env = env_of(the_container(workload), docs)
        # The pods serve the network, so the server demands tokens; never --insecure.
        assert not is_loopback(env["CISPO_HOST"])
        assert env.get("CISPO_INSECURE", "0").lower() in ("", "0", "false", "no", "off")
        tls_secret, cert_key = mounted_secret_file(workload, env["CISPO_TLS_CERT_FILE"])
        assert mounted_secret_file(workload, env["CISPO_TLS_KEY_FILE"]) == (tls_secret, "tls.key")
        assert cert_key == "tls.crt"
        if "CISPO_TLS_CLIENT_CA_FILE" in env:
            assert mounted_secret_file(workload, env["CISPO_TLS_CLIENT_CA_FILE"]) == (tls_secret, "ca.crt")
        assert mounted_secret_file(workload, env["CISPO_AUTH_TOKENS_FILE"]) == ("cispo-auth-tokens", "tokens")
        if not with_certificates:
            continue
        # cert-manager makes that Secret, signed by an Issuer of the same kustomization.
        certificates = of_kind(docs, "Certificate")
        (server_cert,) = [c for c in certificates if c["spec"]["secretName"] == tls_secret]
        assert "server auth" in server_cert["spec"]["usages"]
        assert server_cert["spec"]["dnsNames"]
        issuer = one(docs, "Issuer", server_cert["spec"]["issuerRef"]["name"])
        (ca_cert,) = [c for c in certificates if c["spec"]["secretName"] == issuer["spec"]["ca"]["secretName"]]
        assert ca_cert["spec"]["isCA"] is True
        one(docs, "Issuer", ca_cert["spec"]["issuerRef"]["name"])
        clients = [c for c in certificates if "client auth" in c["spec"].get("usages", [])]
        assert clients and all(c["spec"]["issuerRef"] == server_cert["spec"]["issuerRef"] for c in clients)


@pytest.mark.parametrize("name", SERVER_OVERLAYS)
def test_servers_take_tls_and_tokens_from_mounted_secrets(name):
    check_tls_and_tokens(render(name), with_certificates=name != "base")


def test_the_mtls_component_requires_client_certificates(tmp_path):
    docs = render_with_components(tmp_path, "cpu", "mtls")
    (server,) = servers(docs)
    assert env_of(the_container(server), docs)["CISPO_TLS_CLIENT_CA_FILE"] == "/etc/cispo/tls/ca.crt"
    check_tls_and_tokens(docs, with_certificates=True)


def _matches(selector: dict | None, labels: dict) -> bool:
    assert set(selector or {}) <= {"matchLabels"}, "only matchLabels selectors are modelled here"
    return selects((selector or {}).get("matchLabels", {}), labels)


def admitted(docs: list[dict], workload: dict, port: str | int, source: dict, namespace: dict = NAMESPACE) -> bool:
    """Whether the NetworkPolicies let a pod labelled `source` in a namespace labelled
    `namespace` reach `workload`'s pods on `port` (a container port name or number)."""
    named = {p["name"]: p["containerPort"] for p in the_container(workload).get("ports", [])}
    number = named.get(port, port)
    policies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"] and _matches(p["spec"]["podSelector"], pod_labels(workload))
    ]
    if not policies:
        return True  # not isolated
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, number) for p in ports):
                continue
            for peer in rule.get("from", [{}]):
                assert "ipBlock" not in peer
                if "namespaceSelector" in peer:
                    namespace_ok = _matches(peer["namespaceSelector"], namespace)
                else:
                    namespace_ok = namespace == NAMESPACE
                if namespace_ok and _matches(peer.get("podSelector"), source):
                    return True
    return False


@pytest.mark.parametrize("name", SERVER_OVERLAYS)
def test_networkpolicy_admits_clients_prometheus_and_the_group(name):
    docs = render(name)
    policy = one(docs, "NetworkPolicy", "cispo")
    selected = [w for w in workloads(docs) if _matches(policy["spec"]["podSelector"], pod_labels(w))]
    assert selected == servers(docs)
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    for workload in servers(docs):
        named = {p["name"] for p in the_container(workload)["ports"]}
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), "every rule names its peers"
            assert {p["port"] for p in rule["ports"]} <= named
        # gRPC: labelled clients, here or in a labelled namespace; nobody else.
        assert admitted(docs, workload, "grpc", CLIENT_LABEL)
        assert admitted(docs, workload, "grpc", CLIENT_LABEL, {**CLIENT_LABEL, "kubernetes.io/metadata.name": "rl"})
        assert not admitted(docs, workload, "grpc", CLIENT_LABEL, {"kubernetes.io/metadata.name": "rl"})
        assert not admitted(docs, workload, "grpc", {"app": "something-else"})
        assert not admitted(docs, workload, "grpc", prometheus, MONITORING)
        # metrics: Prometheus in the monitoring namespace only.
        assert admitted(docs, workload, "metrics", prometheus, MONITORING)
        assert not admitted(docs, workload, "metrics", prometheus)
        assert not admitted(docs, workload, "metrics", CLIENT_LABEL)
    # The ranks of a group reach each other on every port; one-pod groups have no peers.
    for target in workloads(docs):
        for source in workloads(docs):
            for port in ("rdzv", 29400, 45678):
                if name in GROUPS:
                    assert admitted(docs, target, port, pod_labels(source)), (target["metadata"]["name"], port)
                elif target in servers(docs):
                    assert not admitted(docs, target, port, pod_labels(source))
