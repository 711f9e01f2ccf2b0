"""infra/ checked offline: the compose file against the Compose Specification, the Kubernetes
manifests against the trimmed schemas in infra/schemas/k8s/, the GPU pools' base job
templates, and the places where the files must agree with each other and with the project
(every variable a container is given is one something in it reads; ports, names, keys).
No network, no Docker, no cluster: what a real daemon or API server would add is not known
here (infra/schemas/README.md)."""
from __future__ import annotations

import ast
import copy
import json
import re

import jsonschema
import pytest
import yaml

from components.deploy import k8s
from tests.conftest import REPO

INFRA = REPO / "infra"
COMPOSE = INFRA / "compose.yaml"
# Files the ConfigMap llmops-files carries (infra/README.md creates it from them).
FILES_CONFIGMAP = {"kubernetes-gpu.json": "infra/pools/kubernetes-gpu.json",
                   "feature_store.yaml": "infra/feast/feature_store.milvus.yaml"}
# Services of other images: the variables each image reads (their documentation), besides
# any the service's own command uses ($$NAME). Milvus maps a variable to its config key by
# lowercasing and dropping "_" (ETCD_ENDPOINTS -> etcd.endpoints).
IMAGE_ENV = {"postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
             "minio/minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
             "quay.io/coreos/etcd": {"ETCD_AUTO_COMPACTION_MODE", "ETCD_AUTO_COMPACTION_RETENTION",
                                     "ETCD_QUOTA_BACKEND_BYTES", "ETCD_SNAPSHOT_COUNT"},
             "redis": set()}
MILVUS_KEYS = {"etcd.endpoints", "minio.address", "minio.accessKeyID", "minio.secretAccessKey", "minio.bucketName",
               "minio.region"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY(S|_ID)?$|AUTH")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def manifests() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted((INFRA / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_schema(kind: str) -> dict:
    return k8s.schema(kind)


def template(name: str) -> dict:
    return json.loads((INFRA / "pools" / f"{name}.json").read_text())


def env_file_keys() -> set[str]:
    return {line.split("=", 1)[0] for line in (INFRA / ".env.example").read_text().splitlines()
            if line and not line.startswith("#")}


def own_image(service: dict) -> bool:
    return service.get("image", "").startswith("${LLMOPS_IMAGE")


def image_name(service: dict) -> str:
    return service["image"].split("${")[-1].split(":-")[-1].rstrip("}").rsplit(":", 1)[0]


# ---------------------------------------------------------------- what the project reads

def project_reads() -> set[str]:
    """Environment variables the project reads: ${VAR} in the spec and the Feast files,
    variables the spec names (*_env keys), and os.environ / os.getenv reads in the code."""
    names: set[str] = set()
    texts = [REPO / "pipelines.yaml", REPO / "feature_repo" / "feature_store.yaml", *(INFRA / "feast").glob("*.yaml")]
    for path in texts:
        names |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", path.read_text()))
    names |= set(re.findall(r"_env:\s*([A-Z_][A-Z0-9_]*)", (REPO / "pipelines.yaml").read_text()))
    for folder in ("llmops", "components", "serving", "flows", "feature_repo"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names |= _env_read(node)
    from components.featureserver import URL_ENV
    from llmops.runner import TELEMETRY_OFF

    return names | set(TELEMETRY_OFF) | {URL_ENV}


def _env_read(node: ast.AST) -> set[str]:
    """``os.environ.get("X")``, ``os.environ.setdefault("X", ..)``, ``os.getenv("X")``, ``os.environ["X"]``."""
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str) and isinstance(node.func, ast.Attribute):
        target = ast.unparse(node.func)
        if target in ("os.environ.get", "os.environ.setdefault", "os.getenv"):
            return {node.args[0].value}
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and ast.unparse(node.value) == "os.environ" \
            and isinstance(node.slice, ast.Constant):
        return {node.slice.value}
    return set()


def prefect_settings() -> set[str]:
    """Every environment variable Prefect's settings accept (names and their aliases)."""
    from pydantic import AliasChoices, BaseModel
    from prefect.settings import Settings

    names: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}_")
                continue
            names.add(f"PREFECT_{prefix}{name}".upper())
            if isinstance(field.validation_alias, AliasChoices):
                names.update(c.upper() for c in field.validation_alias.choices if isinstance(c, str))

    walk(Settings, "")
    return names


def aws_reads() -> set[str]:
    import botocore.configprovider
    from botocore.credentials import EnvProvider

    session = {v[1] for v in botocore.configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.values() if isinstance(v[1], str)}
    return session | {EnvProvider.ACCESS_KEY, EnvProvider.SECRET_KEY}


def mlflow_reads() -> set[str]:
    import mlflow.environment_variables as variables
    from mlflow.cli import server

    return {v.name for v in vars(variables).values() if isinstance(getattr(v, "name", None), str)} | \
        {p.envvar for p in server.params if isinstance(p.envvar, str)}


# ---------------------------------------------------------------- compose

def test_compose_file_follows_the_compose_specification():
    schema = json.loads((INFRA / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert [e.message for e in validator.iter_errors(compose())] == []
    # the schema is strict where it matters: a misspelt key fails
    bad = compose()
    bad["services"]["mlflow"]["healthchek"] = bad["services"]["mlflow"].pop("healthcheck")
    assert any("healthchek" in e.message for e in validator.iter_errors(bad))


def test_compose_project_services_set_only_variables_the_project_reads():
    reads = project_reads() | prefect_settings() | aws_reads()
    services = compose()["services"]
    own = {name: set(s.get("environment", {})) for name, s in services.items() if own_image(s)}
    assert set(own) == {"prefect-server", "feature-server", "worker", "endpoint"}
    assert {name: sorted(names - reads) for name, names in own.items()} == {name: [] for name in own}
    # the check itself rejects a name nothing reads
    assert "LLMOPS_FEATURE_SERVR" not in reads and "LLMOPS_FEATURE_SERVER" in reads


def test_compose_other_services_set_only_variables_their_image_reads():
    services = compose()["services"]
    mlflow_env = set(services["mlflow"]["environment"])
    assert mlflow_env - mlflow_reads() - aws_reads() == set()
    for name, service in services.items():
        if own_image(service) or name == "mlflow":
            continue
        script = json.dumps([service.get("command"), service.get("entrypoint"), service.get("healthcheck")])
        used = {n for n in service.get("environment", {}) if f"$${n}" in script}
        if image_name(service) == "milvusdb/milvus":
            known = {k.lower().replace(".", "") for k in MILVUS_KEYS}
            unknown = {n for n in service["environment"] if n.lower().replace("_", "") not in known}
        else:
            unknown = set(service.get("environment", {})) - IMAGE_ENV[image_name(service)] - used
        assert unknown == set(), f"{name}: {sorted(unknown)}"


def test_compose_secrets_come_from_the_env_file():
    keys = env_file_keys()
    text = COMPOSE.read_text()
    interpolated = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    assert interpolated - keys == set(), "every ${VAR} of compose.yaml is in .env.example"
    for name, service in compose()["services"].items():
        for var, value in service.get("environment", {}).items():
            if SECRET_NAME.search(var):
                assert "${" in str(value), f"{name}.{var} is a literal: secrets come from infra/.env"
    assert "infra/.env" in (REPO / ".gitignore").read_text().split()


def _endpoints(value: str) -> list[tuple[str, int]]:
    """host:port pairs in a URL or a connection string."""
    return [(h, int(p)) for h, p in re.findall(r"(?:^|//|,|@)([a-z][a-z0-9-]*):(\d+)", value)]


def _closure(services: dict, name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for dep, cond in services[todo.pop()].get("depends_on", {}).items():
            if dep not in seen and cond.get("required", True):
                seen.add(dep)
                todo.append(dep)
    return seen


def test_compose_addresses_point_at_services_that_listen_there_and_start_first():
    services = compose()["services"]
    checked = set()
    for name, service in services.items():
        for var, value in service.get("environment", {}).items():
            for host, port in _endpoints(str(value)):
                if host in ("localhost", name):  # Host headers MLflow accepts, not addresses
                    continue
                assert host in services, f"{name}.{var}: no service {host}"
                assert str(port) in services[host].get("expose", []), f"{name}.{var}: {host} does not expose {port}"
                optional = "redis" in services[host].get("profiles", [])
                assert optional or host in _closure(services, name), f"{name} uses {host} before it is up"
                checked.add((name, host))
        health = json.dumps(service.get("healthcheck", {}).get("test", ""))
        for port in re.findall(r"(?:127\.0\.0\.1|localhost):(\d+)", health):
            assert port in service["expose"], f"{name}: healthcheck on {port}, not exposed"
    assert {("worker", "prefect-server"), ("worker", "mlflow"), ("worker", "feature-server"), ("endpoint", "minio"),
            ("mlflow", "postgres"), ("prefect-server", "postgres"), ("feature-server", "milvus"), ("milvus", "etcd"),
            ("feature-server", "redis")} <= checked


def test_compose_dependencies_wait_for_what_they_need():
    services = compose()["services"]
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which it has none of"
            if cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} must run once"
        if name not in ("buckets",):
            assert "healthcheck" in service, f"{name} has no healthcheck"
    buckets = " ".join(services["buckets"]["command"])
    assert "store/mlflow" in buckets and "store/milvus" in buckets
    assert "s3://mlflow/" in " ".join(services["mlflow"]["command"])


def test_compose_volumes_and_feature_store_files_exist():
    data = compose()
    for name, service in data["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: {source}"
            else:
                assert source in data["volumes"], f"{name}: volume {source} is not declared"
    template_path = data["configs"]["feature_store"]["file"]
    for store in ("milvus", "redis"):
        assert (INFRA / template_path.replace("${LLMOPS_FEAST_ONLINE_STORE:-milvus}", store)).exists()
    # the names the Docker GPU pool's jobs join and mount
    docker = template("docker-gpu")["variables"]["properties"]
    assert data["networks"]["default"]["name"] == docker["networks"]["default"][0]
    assert docker["volumes"]["default"][0].split(":")[0] == data["volumes"]["llmops-state"]["name"]


@pytest.mark.parametrize("store, kind", [("milvus", "milvus"), ("redis", "redis")])
def test_feature_store_files_are_what_feast_accepts(store, kind, monkeypatch):
    """Feast parses each online-store variant; only online_store differs from the embedded one."""
    from feast.repo_config import load_repo_config

    env = compose()["x-feast-env"]
    monkeypatch.setenv("LLMOPS_FEAST_STATE", "/var/lib/llmops/feast/support-triage")
    for var in ("LLMOPS_MILVUS_URI", "LLMOPS_REDIS_CONNECTION"):
        monkeypatch.setenv(var, env[var].replace("${REDIS_PASSWORD:-}", "p"))
    path = INFRA / "feast" / f"feature_store.{store}.yaml"
    config = load_repo_config(REPO / "feature_repo", path)
    assert config.online_store.type == kind
    assert (config.online_store.uri if kind == "milvus" else config.online_store.connection_string) \
        in ("http://milvus:19530", "redis:6379,password=p")
    ours, embedded = yaml.safe_load(path.read_text()), yaml.safe_load((REPO / "feature_repo/feature_store.yaml").read_text())
    assert {k: v for k, v in ours.items() if k != "online_store"} == \
        {k: v for k, v in embedded.items() if k != "online_store"}


# ---------------------------------------------------------------- kubernetes

def test_kubernetes_manifests_match_their_schemas():
    kinds = set()
    for name, doc in manifests():
        assert k8s.problems(doc) == [], name
        assert doc["metadata"]["namespace"] == "llmops"
        kinds.add(doc["kind"])
    assert kinds == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler",
                     "ServiceAccount", "Role", "RoleBinding", "InferenceService"}
    gateway = next(d for _, d in manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    broken = copy.deepcopy(gateway)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = container["readinessProbe"]
    del broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    errors = [e.message for e in jsonschema.Draft202012Validator(k8s_schema("Deployment")).iter_errors(broken)]
    assert any("readinesProbe" in e for e in errors) and any("'limits' is a required property" in e for e in errors)


def _by(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == kind}


def test_gateway_probes_health_and_readiness_and_scales():
    gateway = _by("Deployment")["gateway"]
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"]["cpu"]  # the HPA's utilization is relative to it
    hpa = _by("HorizontalPodAutoscaler")["gateway"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "gateway" and hpa["minReplicas"] <= hpa["maxReplicas"]
    assert hpa["metrics"][0]["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}


def test_gateway_points_at_the_inference_service():
    """serve.upstream follows the InferenceService: KServe's Service <name>-predictor, the
    OpenAI routes under /openai/v1, and the name the model is served under."""
    args = _by("Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]["args"]
    sets = dict(a.split("=", 1) for a in args if a.startswith("serve."))
    isvc = _by("InferenceService")["support-triage"]
    model = isvc["spec"]["predictor"]["model"]
    assert sets["serve.upstream.url"] == f"http://{isvc['metadata']['name']}-predictor/openai/v1"
    assert f"--model_name={sets['serve.upstream.model']}" in model["args"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == model["resources"]["requests"]["nvidia.com/gpu"]
    from llmops.spec import load_spec

    overrides = [f"{k}={v.replace('$(POD_NAME)', 'gateway-5d8f9c7b6-x2x7q')}" for k, v in sets.items()]
    serve = load_spec(REPO / "pipelines.yaml", overrides=overrides).pipeline(None)[1].serve
    assert serve.upstream.url == sets["serve.upstream.url"] and serve.upstream.model == "support-triage"


def test_services_target_ports_their_pods_open():
    deployments = _by("Deployment")
    services = _by("Service")
    assert set(services) <= set(deployments)
    for name, service in services.items():
        pod = deployments[name]["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports or port["targetPort"] in ports.values(), name
        for container in pod["spec"]["containers"]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["port"] in ports, f"{name}.{probe}"
    # the addresses in llmops-config reach these Services on their ports
    config = _by("ConfigMap")["llmops-config"]["data"]
    for var, value in config.items():
        for host, port in _endpoints(value):
            if host in services:
                assert port in [p["port"] for p in services[host]["spec"]["ports"]], var


def _env_entries(doc: dict) -> list[dict]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else {}
    return [e for c in spec.get("containers", []) for e in c.get("env", [])]


def test_kubernetes_secrets_are_references_only():
    assert all(d["kind"] != "Secret" for _, d in manifests())
    keys, config = env_file_keys(), _by("ConfigMap")["llmops-config"]["data"]
    docs = [d for _, d in manifests()] + [{"kind": "Deployment", "spec": template("kubernetes-gpu")["job_configuration"]
                                           ["job_manifest"]["spec"]}]
    refs = 0
    for doc in docs:
        for entry in _env_entries(doc):
            if SECRET_NAME.search(entry["name"]):
                assert "valueFrom" in entry, f"{entry['name']} is a literal"
            ref = entry.get("valueFrom", {})
            if "secretKeyRef" in ref:
                assert ref["secretKeyRef"]["name"] == "llmops-secrets" and ref["secretKeyRef"]["key"] in keys
                refs += 1
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["key"] in config
    assert refs >= 8
    readme = (INFRA / "README.md").read_text()
    assert "create secret generic llmops-secrets --from-env-file=infra/.env" in readme
    for key, path in FILES_CONFIGMAP.items():
        assert f"--from-file={key}={path}" in readme and (REPO / path).exists()
    mounted = {i["key"] for _, d in manifests() if d["kind"] == "Deployment"
               for v in d["spec"]["template"]["spec"].get("volumes", [])
               for i in v.get("configMap", {}).get("items", [])}
    subpaths = {m["subPath"] for _, d in manifests() if d["kind"] == "Deployment"
                for c in d["spec"]["template"]["spec"]["containers"] for m in c.get("volumeMounts", []) if "subPath" in m}
    assert mounted | (subpaths - {"feast"}) <= set(FILES_CONFIGMAP)


# ---------------------------------------------------------------- GPU work pools

def _placeholders(value) -> set[str]:
    from prefect.utilities.templating import find_placeholders

    return {p.name for p in find_placeholders(json.dumps(value))}


@pytest.mark.parametrize("name", ["kubernetes-gpu", "docker-gpu"])
def test_pool_templates_declare_every_placeholder_and_the_gpu_count(name):
    t = template(name)
    declared = set(t["variables"]["properties"])
    used = _placeholders(t["job_configuration"])
    assert used - declared == set() and "gpu_count" in used
    assert declared - used == set(), "a declared variable nothing uses would be silently ignored"
    gpu = t["variables"]["properties"]["gpu_count"]
    assert (gpu["type"], gpu["default"], gpu["minimum"]) == ("integer", 1, 1)
    config = t["job_configuration"]
    if name == "kubernetes-gpu":
        container = config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
        assert container["name"] == "prefect-job"  # the container Prefect's worker fills in
    else:
        request = config["container_create_kwargs"]["device_requests"][0]
        assert request == {"driver": "nvidia", "count": "{{ gpu_count }}", "capabilities": [["gpu"]]}
    jsonschema.Draft202012Validator.check_schema(t["variables"])
    defaults = {k: v["default"] for k, v in t["variables"]["properties"].items() if "default" in v}
    jsonschema.validate(defaults, t["variables"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu_count": 0}, t["variables"])
