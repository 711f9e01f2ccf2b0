"""target kserve: the version's merged weights in S3, an InferenceService serving them with
KServe's Hugging Face runtime (vLLM on GPU nodes), and the gateway (`llmops serve` with
serve.upstream at it) in front.

The manifests are built as data from the hand-written ones in ``infra/k8s/``
(inferenceservice.yaml, gateway.yaml), so both stay one shape; they are checked offline
against ``infra/schemas/k8s/`` (:func:`check`), written as one multi-document YAML file,
and applied with kubectl only when ``deploy.kserve.context`` names a cluster.

The model server's readiness probe answers the version's golden chat (the first validation
chat, llmops-model.json ``golden``) through the runtime's own OpenAI route and passes only
when the answer parses as a JSON object: a replica whose weights load but answer nonsense
never takes traffic, and under strategy canary KServe does not route to that revision.
"""
from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from components.base import StageError
from components.catalog import ModelError
from components.deploy.k8s import check
from components.deploy.settings import KServeTarget
from components.s3 import upload_tree

__all__ = ["merged_weights", "publish", "manifests", "check", "write", "apply"]

TEMPLATES = Path(__file__).resolve().parents[2] / "infra" / "k8s"
RUNTIME_PORT = 8080  # the Hugging Face runtime's HTTP port; KServe's Service maps port 80 to it
OPENAI_ROUTE = "/openai/v1"  # its OpenAI-compatible routes (KServe's default KSERVE_OPENAI_ROUTE_PREFIX)
STRATEGIES = ("direct", "shadow", "canary")
APPLY_TIMEOUT_S = 300

# Run by the kubelet inside the model server's container (its image has python3): send the
# golden chat to the runtime's chat route, greedily, and exit non-zero unless the answer is a
# JSON object. argv: URL, request body (JSON), timeout in seconds. Standard library only.
PROBE_SCRIPT = """\
import json, sys, urllib.request
url, body, timeout = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3])
request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=timeout) as response:
    answer = json.load(response)["choices"][0]["message"]["content"]
try:
    parsed = json.loads(answer)
except ValueError:
    parsed = None
if not isinstance(parsed, dict):
    sys.exit("golden prompt: the answer is not a JSON object: " + repr(answer[:200]))
"""


# ---------------------------------------------------------------- weights

def merged_weights(folder: Path, catalog: dict, state_dir: Path, out: Path) -> Path:
    """The version in ``folder`` (fetched: serving.model.fetch) as one Hugging Face model:
    the catalog's base model with the version's adapter merged into its weights, saved as
    safetensors with its config and the version's tokenizer (chat template included) in
    ``out/`` (replaced). Every file is checked as serving checks it first (base weights and
    adapter against the manifest's SHA-256); ModelError names a file at fault, or an
    adapter method that cannot be merged."""
    from peft import PeftModel

    from serving.model import load_folder

    _, tokenizer, model = load_folder(folder, catalog, state_dir, weights="adapter")
    if isinstance(model, PeftModel):
        kind = model.peft_config["default"].peft_type.value
        raise ModelError(f"{folder / 'adapter'}: a {kind} adapter cannot be merged into the base weights; "
                         "the KServe runtime serves one plain model (fine-tune with LoRA or IA3)")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def publish(weights: Path, cfg: KServeTarget, name: str, version: int, s3_endpoint_url: str | None) -> str:
    """Upload the merged model folder to ``<storage_uri>/<name>/<version>/`` and return that
    URI (with its closing slash, so version 1 never also matches version 10's files).
    StageError when the folder holds no safetensors or the upload fails."""
    if not any(weights.glob("*.safetensors")):
        raise StageError(f"{weights}: no .safetensors weights to publish (merged_weights writes them)")
    uri = f"{cfg.storage_uri.rstrip('/')}/{name}/{version}/"
    upload_tree(weights, uri, s3_endpoint_url)
    return uri


# ---------------------------------------------------------------- manifests

def _templates(file: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((TEMPLATES / file).read_text()) if doc}


def readiness_probe(name: str, golden: dict | None, gpus: int) -> dict:
    """The model server's readiness probe: the golden chat through the runtime's
    ``/openai/v1/chat/completions`` (the runtime renders it with the chat template of the
    tokenizer saved beside the weights, as the gateway does for ``/completions``), answer
    parsed as a JSON object. Without a golden example: the runtime's model-ready route."""
    period, timeout = (30, 20) if gpus else (120, 90)  # a CPU replica generates slowly
    timing = {"periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": 3}
    if not golden:
        return {"httpGet": {"path": f"{OPENAI_ROUTE}/models/{name}", "port": RUNTIME_PORT}} | timing
    answer = golden.get("answer", "")
    # Byte-level BPE: every token is at least one byte, so the gold answer's bytes bound its tokens.
    body = {"model": name, "messages": golden["messages"], "temperature": 0,
            "max_tokens": max(64, len(answer.encode()) + 16)}
    url = f"http://127.0.0.1:{RUNTIME_PORT}{OPENAI_ROUTE}/chat/completions"
    command = ["python3", "-c", PROBE_SCRIPT, url, json.dumps(body, ensure_ascii=False), str(timeout - 2)]
    return {"exec": {"command": command}} | timing


def _resources(cfg: KServeTarget) -> dict:
    """Limits equal to requests (Guaranteed QoS: a model server is not throttled or evicted first)."""
    amounts = {"cpu": cfg.cpu, "memory": cfg.memory} | ({"nvidia.com/gpu": str(cfg.gpus)} if cfg.gpus else {})
    return {"requests": dict(amounts), "limits": dict(amounts)}


def inference_service(cfg: KServeTarget, *, name: str, version: int, storage_uri: str, strategy: str,
                      canary_percent: int, golden: dict | None) -> list[dict]:
    """The storage ServiceAccount and the InferenceService (from infra/k8s/inferenceservice.yaml)."""
    docs = _templates("inferenceservice.yaml")
    account, isvc = copy.deepcopy(docs["ServiceAccount"]), copy.deepcopy(docs["InferenceService"])
    account["metadata"] |= {"name": cfg.service_account, "namespace": cfg.namespace}
    meta = isvc["metadata"]
    meta |= {"name": name, "namespace": cfg.namespace}
    meta["labels"] = meta.get("labels", {}) | {"llmops/version": str(version)}
    meta["annotations"] = meta.get("annotations", {}) | {"serving.kserve.io/deploymentMode": cfg.deployment_mode}
    predictor = isvc["spec"]["predictor"]
    predictor |= {"serviceAccountName": cfg.service_account, "minReplicas": cfg.min_replicas,
                  "maxReplicas": cfg.max_replicas}
    if strategy == "canary":
        predictor["canaryTrafficPercent"] = canary_percent
    model = predictor["model"]
    backend = "vllm" if cfg.gpus else "huggingface"
    model |= {"args": [f"--model_name={name}", f"--backend={backend}", *cfg.runtime_args],
              "storageUri": storage_uri, "resources": _resources(cfg),
              "readinessProbe": readiness_probe(name, golden, cfg.gpus)}
    return [account, isvc]


def _sets(args: list[str]) -> dict[str, str]:
    """The ``--set key=value`` pairs of a command line."""
    return dict(args[i + 1].split("=", 1) for i, arg in enumerate(args[:-1]) if arg == "--set")


def gateway(cfg: KServeTarget, *, name: str, version: int, serve) -> list[dict]:
    """Deployment, Service and autoscaler ``<name>-gateway`` (from infra/k8s/gateway.yaml):
    `llmops serve` pinned to this version, with serve.upstream at the InferenceService's
    Service ``<name>-predictor`` and the name the runtime serves it under."""
    docs = _templates("gateway.yaml")
    gateway_name, labels = f"{name}-gateway", {"app.kubernetes.io/name": f"{name}-gateway"}
    out = []
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler"):
        doc = copy.deepcopy(docs[kind])
        doc["metadata"] |= {"name": gateway_name, "namespace": cfg.namespace}
        doc["metadata"]["labels"] = doc["metadata"].get("labels", {}) | labels | {"llmops/version": str(version)}
        out.append(doc)
    deployment, service, autoscaler = out
    spec = deployment["spec"]
    spec["replicas"] = cfg.gateway_replicas
    spec["selector"]["matchLabels"] = dict(labels)
    spec["template"]["metadata"]["labels"] |= labels
    container = spec["template"]["spec"]["containers"][0]
    sets = _sets(container["args"]) | {
        "serve.model": f"{name}/{version}",
        "serve.upstream.url": f"http://{name}-predictor.{cfg.namespace}{OPENAI_ROUTE}",
        "serve.upstream.model": name,
        "serve.upstream.connect_timeout_s": str(serve.upstream.connect_timeout_s),
        "serve.upstream.read_timeout_s": str(serve.upstream.read_timeout_s),
        "serve.upstream.max_concurrent": str(serve.upstream.max_concurrent)}
    head = container["args"][:container["args"].index("--set")] if "--set" in container["args"] else container["args"]
    container |= {"image": cfg.gateway_image,
                  "args": head + [part for key, value in sets.items() for part in ("--set", f"{key}={value}")]}
    service["spec"]["selector"] = dict(labels)
    hpa = autoscaler["spec"]
    hpa["scaleTargetRef"]["name"] = gateway_name
    hpa["minReplicas"], hpa["maxReplicas"] = cfg.gateway_replicas, max(hpa["maxReplicas"], cfg.gateway_replicas)
    return out


def manifests(cfg: KServeTarget, *, name: str, version: int, storage_uri: str, strategy: str,
              canary_percent: int, golden: dict | None, serve) -> list[dict]:
    """Every document of the deployment: ServiceAccount, InferenceService (canaryTrafficPercent
    only for strategy canary), the gateway's Deployment, Service and autoscaler. ValueError
    for a strategy this target cannot carry out as configured."""
    if strategy not in STRATEGIES:
        raise ValueError(f"deploy.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "canary":
        if not 0 < canary_percent < 100:
            raise ValueError(f"canary share must be 1-99 percent of traffic (got {canary_percent})")
        if cfg.deployment_mode != "Serverless":
            raise ValueError("deploy.kserve.deployment_mode: strategy canary needs Serverless (KServe splits "
                             f"traffic between revisions only through Knative; got {cfg.deployment_mode})")
    if not storage_uri.startswith("s3://"):
        raise ValueError(f"storage_uri: expected the s3:// URI publish returned (got {storage_uri!r})")
    return [*inference_service(cfg, name=name, version=version, storage_uri=storage_uri, strategy=strategy,
                               canary_percent=canary_percent, golden=golden),
            *gateway(cfg, name=name, version=version, serve=serve)]


# ---------------------------------------------------------------- files and the cluster

class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the probe's script) as literal blocks, readable in the file."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def write(docs: list[dict], folder: Path) -> Path:
    """``folder/kserve.yaml``: every document, in order, as one multi-document YAML file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kserve.yaml"
    text = yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    path.write_text("# kubectl apply -f this file (deploy.kserve.context set: the deploy stage applies it)\n" + text)
    return path


def apply(path: Path, cfg: KServeTarget) -> str:
    """Without ``cfg.context``: the ``kubectl apply -f <path>`` command, for the stage to print
    (nothing runs). With one: run ``kubectl --context <ctx> apply -f <path>`` and return what
    it printed; RuntimeError when kubectl is missing or the apply fails, with its message."""
    if cfg.context is None:
        return f"kubectl apply -f {shlex.quote(str(path))}"
    kubectl = shutil.which("kubectl")
    command = f"kubectl --context {shlex.quote(cfg.context)} apply -f {shlex.quote(str(path))}"
    if kubectl is None:
        raise RuntimeError(f"{command}: kubectl is not on PATH (install it, or set deploy.kserve.context: null "
                           "to print the command instead)")
    try:
        done = subprocess.run([kubectl, "--context", cfg.context, "apply", "-f", str(path)], capture_output=True,
                              text=True, timeout=APPLY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{command}: no answer within {APPLY_TIMEOUT_S} s") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-5:]
        raise RuntimeError(f"{command} failed (exit {done.returncode}): " + " | ".join(said))
    return done.stdout
