"""target kserve: manifests checked against the kept schemas, the readiness probe run against a
live HTTP server, the merged weights of a tiny version, the upload to moto's S3 server, and
kubectl's command line."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from components.base import StageError
from components.deploy import kserve
from components.deploy.settings import KServeTarget
from serving.settings import ServeSpec
from tests.conftest import REPO

NAME, VERSION, URI = "support-triage", 7, "s3://llmops/models/support-triage/7/"
GOLDEN = {"messages": [{"role": "system", "content": "Answer with JSON."},
                       {"role": "user", "content": "Subject: CSV export stops at 274 rows"}],
          "answer": '{"category": "bug", "priority": "high"}'}


def build(strategy: str, cfg: KServeTarget | None = None, golden: dict | None = GOLDEN) -> dict[str, dict]:
    cfg = cfg or KServeTarget(deployment_mode="Serverless" if strategy == "canary" else "RawDeployment")
    docs = kserve.manifests(cfg, name=NAME, version=VERSION, storage_uri=URI, strategy=strategy, canary_percent=10,
                            golden=golden, serve=ServeSpec())
    return {d["kind"]: d for d in docs}


def predictor(docs: dict) -> dict:
    return docs["InferenceService"]["spec"]["predictor"]


@pytest.mark.parametrize("strategy", ["direct", "shadow", "canary"])
def test_manifests_validate_and_carry_the_version(strategy, tmp_path):
    docs = build(strategy)
    kserve.check(list(docs.values()))
    assert list(docs) == ["ServiceAccount", "InferenceService", "Deployment", "Service", "HorizontalPodAutoscaler"]
    pred = predictor(docs)
    assert pred.get("canaryTrafficPercent") == (10 if strategy == "canary" else None)
    assert ("canaryTrafficPercent" in pred) == (strategy == "canary")
    model = pred["model"]
    assert model["storageUri"] == URI
    assert model["args"][:2] == [f"--model_name={NAME}", "--backend=vllm"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mode = docs["InferenceService"]["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    assert mode == ("Serverless" if strategy == "canary" else "RawDeployment")
    # the file holds the same documents, in order
    path = kserve.write(list(docs.values()), tmp_path)
    assert list(yaml.safe_load_all(path.read_text())) == list(docs.values())


def test_gateway_points_at_the_inference_service_and_the_spec_accepts_it():
    from llmops.spec import load_spec

    docs = build("direct")
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    sets = kserve._sets(container["args"])
    assert sets["serve.upstream.url"] == f"http://{NAME}-predictor.llmops/openai/v1"
    assert f"--model_name={sets['serve.upstream.model']}" in predictor(docs)["model"]["args"]
    assert sets["serve.model"] == f"{NAME}/{VERSION}"
    overrides = [f"{k}={v.replace('$(POD_NAME)', 'gw-0')}" for k, v in sets.items()]
    serve = load_spec(REPO / "pipelines.yaml", overrides=overrides).pipeline(None)[1].serve
    assert (serve.upstream.url, serve.upstream.model, serve.model) == (sets["serve.upstream.url"], NAME, f"{NAME}/7")
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]


def test_check_refuses_a_broken_document_naming_it_and_the_path():
    docs = build("canary")
    kserve.check(list(docs.values()))
    broken = copy.deepcopy(docs)
    predictor(broken)["minReplicas"] = "one"
    predictor(broken)["canaryTrafficPercent"] = 150
    with pytest.raises(ValueError) as caught:
        kserve.check(list(broken.values()))
    message = str(caught.value)
    assert f"InferenceService/{NAME}: $.spec.predictor.minReplicas: 'one' is not of type 'integer'" in message
    assert f"InferenceService/{NAME}: $.spec.predictor.canaryTrafficPercent: 150 is greater than" in message
    gateway = copy.deepcopy(docs["Deployment"])
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(ValueError, match=rf"Deployment/{NAME}-gateway: \$.spec.template.spec.containers\[0\]: "
                                         r"Additional properties .*'readinesProbe'"):
        kserve.check([gateway])


def test_a_vllm_model_server_needs_its_gpu_limit_and_a_cpu_one_does_not():
    cpu = build("direct", KServeTarget(gpus=0))
    kserve.check(list(cpu.values()))
    assert predictor(cpu)["model"]["args"][1] == "--backend=huggingface"
    assert "nvidia.com/gpu" not in predictor(cpu)["model"]["resources"]["limits"]
    gpu = build("direct")
    del predictor(gpu)["model"]["resources"]["limits"]["nvidia.com/gpu"]
    with pytest.raises(ValueError, match="'nvidia.com/gpu' is a required property"):
        kserve.check([gpu["InferenceService"]])


def test_canary_needs_serverless_mode_and_a_share():
    with pytest.raises(ValueError, match="deployment_mode: strategy canary needs Serverless"):
        build("canary", KServeTarget())
    with pytest.raises(ValueError, match="canary share must be 1-99"):
        kserve.manifests(KServeTarget(deployment_mode="Serverless"), name=NAME, version=1, storage_uri=URI,
                         strategy="canary", canary_percent=0, golden=None, serve=ServeSpec())


class _Runtime(BaseHTTPRequestHandler):
    """An OpenAI chat route on 127.0.0.1 answering ``content`` and keeping what it was sent."""
    content = ""
    received: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.path, body))
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": type(self).content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def runtime():
    server = HTTPServer(("127.0.0.1", 0), _Runtime)
    _Runtime.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("content, passes", [('{"category": "bug", "priority": "high"}', True),
                                             ("Sure! The category is bug.", False), ('["bug"]', False)])
def test_readiness_probe_sends_the_golden_chat_and_needs_a_json_answer(runtime, content, passes):
    probe = predictor(build("direct"))["model"]["readinessProbe"]
    command = probe["exec"]["command"]
    assert command[0] == "python3" and command[3] == "http://127.0.0.1:8080/openai/v1/chat/completions"
    assert int(command[5]) < probe["timeoutSeconds"]
    _Runtime.content = content
    local = [sys.executable, *command[1:3], f"http://127.0.0.1:{runtime.server_port}/openai/v1/chat/completions",
             *command[4:]]
    done = subprocess.run(local, capture_output=True, text=True, timeout=60)
    assert (done.returncode == 0) == passes, done.stderr
    if not passes:
        assert "the answer is not a JSON object" in done.stderr
    path, body = _Runtime.received[0]
    assert path == "/openai/v1/chat/completions"
    assert body["model"] == NAME and body["messages"] == GOLDEN["messages"] and body["temperature"] == 0
    assert body["max_tokens"] >= len(GOLDEN["answer"])


def test_readiness_without_a_golden_example_asks_the_model_route():
    probe = predictor(build("direct", golden=None))["model"]["readinessProbe"]
    assert probe["httpGet"] == {"path": f"/openai/v1/models/{NAME}", "port": 8080}


def test_publish_uploads_the_folder_to_s3(s3_endpoint, tmp_path):
    from components.s3 import client

    weights = tmp_path / "merged"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"w" * 1000)
    (weights / "config.json").write_text('{"model_type": "llama"}')
    s3 = client(s3_endpoint)
    s3.create_bucket(Bucket="llmops")
    uri = kserve.publish(weights, KServeTarget(storage_uri="s3://llmops/models"), NAME, 3, s3_endpoint)
    assert uri == f"s3://llmops/models/{NAME}/3/"
    listed = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="llmops")["Contents"]}
    assert listed == {f"models/{NAME}/3/model.safetensors": 1000, f"models/{NAME}/3/config.json": 23}
    assert s3.get_object(Bucket="llmops", Key=f"models/{NAME}/3/config.json")["Body"].read() == b'{"model_type": "llama"}'
    (weights / "model.safetensors").unlink()
    with pytest.raises(StageError, match="no .safetensors weights"):
        kserve.publish(weights, KServeTarget(), NAME, 4, s3_endpoint)
    with pytest.raises(StageError, match="cannot upload to s3://missing-bucket"):
        (weights / "model.safetensors").write_bytes(b"w")
        kserve.publish(weights, KServeTarget(storage_uri="s3://missing-bucket"), NAME, 4, s3_endpoint)


def test_apply_prints_the_command_without_a_context_and_needs_kubectl_with_one(tmp_path, monkeypatch):
    path = tmp_path / "deploy dir" / "kserve.yaml"
    assert kserve.apply(path, KServeTarget()) == f"kubectl apply -f '{path}'"
    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl here
    with pytest.raises(RuntimeError, match="kubectl --context prod apply -f .*: kubectl is not on PATH"):
        kserve.apply(path, KServeTarget(context="prod"))


# ---------------------------------------------------------------- merged weights

@pytest.fixture(scope="module")
def tiny_version(tiny, tmp_path_factory):
    """A version folder as fetch leaves it: a LoRA adapter (random, non-zero: it changes the
    outputs) on the tiny model, and a manifest with both SHA-256."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from components.base import file_sha256
    from components.catalog import weights_sha256
    from components.lm import load_tokenizer
    from serving.model import MANIFEST

    root = tmp_path_factory.mktemp("kserve-version")
    folder, state = root / "version", root / "state"
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder / "adapter")
    load_tokenizer(tiny).save_pretrained(folder / "adapter")
    (folder / MANIFEST).write_text(json.dumps({
        "base_model": {"name": str(tiny), "sha256": weights_sha256(str(tiny), state)},
        "adapter_sha256": file_sha256(folder / "adapter" / "adapter_model.safetensors"), "golden": GOLDEN}))
    return {"folder": folder, "state": state, "tiny": tiny}


def _logits(model, tokenizer):
    import torch

    ids = torch.tensor([tokenizer.apply_chat_template(GOLDEN["messages"], add_generation_prompt=True)])
    with torch.no_grad():
        return model(ids.to(model.device)).logits.float().cpu()


def test_merged_weights_answer_as_base_plus_adapter(tiny_version, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from components.lm import load, load_tokenizer

    out = kserve.merged_weights(tiny_version["folder"], {}, tiny_version["state"], tmp_path / "merged")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    tokenizer = load_tokenizer(out)  # the version's, with its chat template, for the runtime's chat route
    tokenizer_ref, unmerged = load(tiny_version["tiny"], adapter=tiny_version["folder"] / "adapter", merge=False,
                                   device=torch.device("cpu"))
    assert tokenizer.apply_chat_template(GOLDEN["messages"]) == tokenizer_ref.apply_chat_template(GOLDEN["messages"])
    expected = _logits(unmerged, tokenizer_ref)
    assert torch.allclose(_logits(merged, tokenizer), expected, atol=1e-4)
    _, base = load(tiny_version["tiny"], device=torch.device("cpu"))
    assert (_logits(base, tokenizer_ref) - expected).abs().max() > 1e-2  # the adapter is in the merged weights


def test_merged_weights_refuses_an_altered_adapter(tiny_version, tmp_path):
    import shutil

    from components.catalog import ModelError

    copy_ = tmp_path / "version"
    shutil.copytree(tiny_version["folder"], copy_)
    with (copy_ / "adapter" / "adapter_model.safetensors").open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ModelError, match="adapter_model.safetensors: SHA-256 .* does not match"):
        kserve.merged_weights(copy_, {}, tiny_version["state"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
