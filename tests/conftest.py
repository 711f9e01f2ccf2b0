"""Shared fixtures: small generated data, and throwaway copies of the project for
integration tests that run the real CLI, Prefect and DVC."""
from __future__ import annotations

import contextlib
import json
import threading
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from components import generate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Files a project copy needs: the spec, the DVC pipeline, and the code DVC tracks as deps.
PROJECT_FILES = ("pipelines.yaml", "dvc.yaml", ".dvcignore", ".dvc/config", "components", "serving", "feature_repo")


@contextlib.contextmanager
def sqlite_registry(folder: Path, experiment: str = "t"):
    """Point MLflow at a fresh SQLite store in ``folder`` with ``experiment`` active, its
    artifacts under ``folder`` too (MLflow's default would be ./mlruns); restores the
    previous tracking URI after."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(folder / "artifacts").resolve().as_uri())
    mlflow.set_experiment(experiment_name=experiment)  # not the id another test's store left active
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session", autouse=True)
def _tracking_store(tmp_path_factory):
    """Components called directly log to a throwaway MLflow store; nothing may appear in
    the working directory (a stray ./mlruns fails the session)."""
    before = {p.name for p in Path.cwd().iterdir()}
    with sqlite_registry(tmp_path_factory.mktemp("mlflow"), "Default") as uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        yield
    stray = sorted({p.name for p in Path.cwd().iterdir()} - before)
    assert not stray, f"the tests wrote {stray} into {Path.cwd()}"


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 API (moto's server) on 127.0.0.1, with test credentials in the environment
    as production takes them; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_small() -> generate.DemoData:
    """300 tickets from 60 customers: big enough for every split, fast to build."""
    return generate.generate(n_tickets=300, n_customers=60, seed=3)


def build_features_and_prepare(root: Path, data: generate.DemoData, prepare_cfg=None, features_cfg=None,
                               task=None, pipeline: str = "t", state_dir: Path | None = None):
    """Run the features and prepare stages on ``data`` (as validated tables) with a copy of
    feature_repo/ and a state folder under ``root`` (or ``state_dir``); returns (features
    result, prepare result, io)."""
    from components import features, prepare
    from components.base import StageIO
    from components.featurestore import FeaturesSpec
    from components.task import TaskSpec
    from llmops.spec import load_spec

    spec = load_spec(REPO / "pipelines.yaml", env={})
    prepare_cfg = prepare_cfg or prepare.PrepareSpec()
    features_cfg = features_cfg or FeaturesSpec()
    repo = root / "feature_repo"
    shutil.copytree(REPO / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    validated = root / "validate"
    data.write(validated)
    common = dict(pipeline=pipeline, state_dir=state_dir or root / "state", models=dict(spec.models),
                  feature_repo=repo)
    (root / "features").mkdir()
    f_io = StageIO(out_dir=root / "features", inputs={"validate": validated}, **common)
    f_result = features.run(features_cfg, f_io)
    (root / "prepare").mkdir()
    p_io = StageIO(out_dir=root / "prepare", inputs={"validate": validated, "features": root / "features"},
                   sections={"features": features_cfg, "task": task or TaskSpec()}, **common)
    return f_result, prepare.run(prepare_cfg, p_io), p_io


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    # Each project copy keeps its own Prefect state; never reuse the developer's.
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "LLMOPS_STATE_DIR", "LLMOPS_SPEC", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, check: bool = False, tool: str = "llmops",
            **env: str) -> subprocess.CompletedProcess:
    """Run ``tool ARGS`` (a command of the project's venv: llmops, dvc) in ``cwd``."""
    cmd = [str(BIN / tool), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


# The small project the integration tests run: 300 tickets, fine-tuning to 2 steps of 2 chats
# on the real base model, evaluation on 6 test chats, compression to the default variants
# measured on 4 chats, probes from 1 test chat. Such a model cannot pass the shipped gates, so
# promotion runs in warn mode (tests of enforcement set it back); nor does it write valid
# answers, so deploy's smoke set (4 chats) asks for none. The deploy stage, which leaves an
# endpoint running, is left out: the shared run (pipeline_run) and the deploy tests add it
# back with a port of their own and stop the endpoint.
TRAINING = ["ingest", "validate", "features", "prepare", "finetune", "evaluate", "compress", "gates", "register",
            "promote"]
SMALL = {"stages": TRAINING, "ingest.source.n_tickets": 300, "finetune.max_steps": 2, "finetune.batch_size": 2,
         "finetune.eval_examples": 4, "finetune.eval_every": 2, "evaluate.max_examples": 6,
         "evaluate.latency_requests": 2, "compress.measure.examples": 4, "compress.measure.latency_requests": 2,
         "compress.measure.forward_repeats": 2, "gates.probe_examples": 1, "promote.mode": "warn",
         "deploy.smoke.examples": 4, "deploy.smoke.min_valid_rate": 0.0}


def set_keys(text: str, values: dict, pipeline: str = "support-triage") -> str:
    """The spec's text with the value of each key path (relative to the pipeline) replaced
    on its own line, comments kept."""

    from llmops.spec_errors import line_numbers

    lines = text.splitlines()
    where = line_numbers(text)
    for key, value in values.items():
        n = where[("pipelines", pipeline, *key.split("."))]
        head, colon, rest = lines[n - 1].partition(":")
        comment = rest[rest.index("  #"):] if "  #" in rest else ""
        lines[n - 1] = f"{head}{colon} {json.dumps(value)}{comment}"
    return "\n".join(lines) + "\n"


def make_project(dest: Path, values: dict | None = None) -> Path:
    """A copy of the project's spec, dvc.yaml, code and Feast repository in a new git repo,
    made small (:data:`SMALL`, then ``values``), sharing the provisioned models."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    spec = dest / "pipelines.yaml"
    spec.write_text(set_keys(spec.read_text(), SMALL | (values or {})))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    # Models are provisioned state (as `make setup` leaves it): share the repo's.
    (dest / ".llmops").mkdir()
    (dest / ".llmops" / "models").symlink_to(provisioned_models())
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh small project (:func:`make_project`)."""
    return make_project(tmp_path / "project")


def provisioned_models() -> Path:
    """The repo's provisioned model folder, pulling the base model first if needed."""
    from components.catalog import pull
    from llmops.spec import load_spec

    spec = load_spec(REPO / "pipelines.yaml", env={})
    pull("smollm2-135m-instruct", spec.models["smollm2-135m-instruct"], spec.state_dir(REPO))
    return spec.state_dir(REPO) / "models"


# ---------------------------------------------------------------- a tiny model and its run

@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A 2-block Llama with random weights and SmolLM2's tokenizer (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    smollm2 = provisioned_models() / "smollm2-135m-instruct"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smollm2 / name).exists():
            shutil.copy(smollm2 / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tiny, tmp_path_factory) -> dict:
    """prepare/, finetune/ and evaluate/ folders as the stages leave them: the tiny model
    fine-tuned for 3 steps on prompt-template chats and evaluated on 6 test chats."""
    from components.base import StageIO
    from components.evaluate import EvaluateSpec
    from components.evaluate import run as evaluate
    from components.finetune import FinetuneSpec, fit
    from components.reports import TrainingReport
    from tests.components.conftest import triage_examples, write_prepared

    root = tmp_path_factory.mktemp("tiny-run")
    splits = write_prepared(root / "prepare", {"train": triage_examples(12, 100),
                                               "validation": triage_examples(4, 200), "test": triage_examples(6)})
    ft_cfg = FinetuneSpec(base_model=str(tiny), max_steps=3, batch_size=4, warmup_steps=1, eval_every=3,
                          eval_examples=4, seed=1)
    TrainingReport(**fit(ft_cfg, str(tiny), triage_examples(12, 100), triage_examples(4, 200), root / "finetune",
                         root / "ckpt", progress=False)).write(root / "finetune")
    (root / "evaluate").mkdir()
    eval_cfg = EvaluateSpec(batch_size=3, max_new_tokens=8, latency_requests=1)
    result = evaluate(eval_cfg, StageIO(pipeline="t", out_dir=root / "evaluate", state_dir=root / "state",
                                        inputs={"prepare": root / "prepare", "finetune": root / "finetune"},
                                        sections={"finetune": ft_cfg}))
    result.report.write(root / "evaluate")
    return {"root": root, "finetune": ft_cfg, "evaluate": eval_cfg, "splits": splits, "tiny": tiny}


def register_run(run: dict, out_dir: Path, model_name: str, inputs: dict | None = None,
                 context: dict | None = None, sections: dict | None = None):
    """The register stage on a tiny run (its prepare/, finetune/ and evaluate/, plus
    ``inputs`` such as gates/ or compress/) into ``out_dir`` (created), in the active MLflow
    registry; returns the stage's result."""
    from components.base import StageIO
    from components.register import RegisterSpec
    from components.register import run as register
    from components.task import TaskSpec

    root = run["root"]
    out_dir.mkdir(parents=True)
    return register(RegisterSpec(model_name=model_name), StageIO(
        pipeline="t", out_dir=out_dir, state_dir=root / "state",
        inputs={s: root / s for s in ("prepare", "finetune", "evaluate")} | (inputs or {}),
        sections={"finetune": run["finetune"], "task": TaskSpec()} | (sections or {}), context=context or {}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """Steady load on an endpoint: ``clients`` threads, each sending ``chat`` (a chat
    completions body; its message made unique per request) one after another until stopped;
    every outcome kept: (client, started, ended, status, X-LLMOps-Model)."""

    def __init__(self, url: str, chat: dict, clients: int = 4):
        self.url, self.chat, self.results, self._stop = url, chat, [], threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        import httpx

        with httpx.Client(timeout=60) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                body = self.chat | {"messages": [{"role": "user", "content": f"ticket {i}-{n}: where is my invoice?"}]}
                started = time.perf_counter()
                try:
                    r = http.post(f"{self.url}/v1/chat/completions", json=body)
                    status, model = r.status_code, r.headers.get("x-llmops-model")
                except httpx.HTTPError as exc:
                    status, model = f"transport: {exc}", None
                self.results.append((i, started, time.perf_counter(), status, model))

    def wait_for(self, more: int, timeout_s: float = 60) -> None:
        target, deadline = len(self.results) + more, time.monotonic() + timeout_s
        while len(self.results) < target:
            assert time.monotonic() < deadline, f"the load got {len(self.results)} of {target} answers"
            time.sleep(0.05)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


    def per_client(self) -> list[list[str | None]]:
        """Each client's answering versions, in the order it sent its requests."""
        return [[r[4] for r in sorted((r for r in self.results if r[0] == c), key=lambda r: r[1])]
                for c in range(len(self._threads))]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    """Wait until ``url`` answers 200; a server that exits or stays silent fails with its log."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what} did not start: {log.read_text()[-2000:]}")
        time.sleep(1)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server (`prefect server start`) on 127.0.0.1 with its own home and
    SQLite database; yields its API URL. Stopped at the end of the session."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = cli_env(PREFECT_HOME=str(home), PREFECT_SERVER_LOGGING_LEVEL="WARNING")
    with (home / "server.log").open("w") as log:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    # the first start creates the database (~45 s on a busy machine)
    wait_healthy(f"{url}/health", proc, home / "server.log", 240, "prefect server")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def prefect_worker(api_url: str, pool: str, log_path: Path, **env: str):
    """`prefect worker start --pool POOL` on the server at ``api_url``, polling every 2 s,
    logging to ``log_path``; stopped (its whole process group) on exit, however the test ends."""
    from components.background import stop_pid

    with log_path.open("w") as log:
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", f"{pool}-test"],
                                cwd=log_path.parent, env=cli_env(**{"PREFECT_API_URL": api_url,
                                                                    "PREFECT_WORKER_QUERY_SECONDS": "2", **env}),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_pid(proc.pid, timeout_s=30)


def clear_deployments(api_url: str) -> None:
    """Delete the project's deployments and their automations from a Prefect server the
    session shares, so the next test finds it as it was (Prefect keeps a deployment's
    trigger automations when the deployment is deleted)."""
    import httpx

    for d in httpx.post(f"{api_url}/deployments/filter", json={}, timeout=30).json():
        if "llmops" in d["tags"]:
            httpx.delete(f"{api_url}/deployments/{d['id']}", timeout=30)
    for a in httpx.post(f"{api_url}/automations/filter", json={}, timeout=30).json():
        if ": drift -> retrain" in a["name"]:
            httpx.delete(f"{api_url}/automations/{a['id']}", timeout=30)


class _Receiver(BaseHTTPRequestHandler):
    """Keeps every POST's path and JSON body."""

    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    """A real HTTP receiver on 127.0.0.1; yields (its URL, the (path, JSON body) it received)."""
    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Receiver.received
    server.shutdown()


@pytest.fixture
def smtp():
    """A real SMTP server (aiosmtpd) on 127.0.0.1; yields ("host:port", the messages it received)."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    class Inbox(Message):
        def __init__(self):
            super().__init__()
            self.messages = []

        def handle_message(self, message):
            self.messages.append(message)

    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield f"127.0.0.1:{port}", inbox.messages
    controller.stop()


# ---------------------------------------------------------------- the shared pipeline run

# Gates a 2-step fine-tune can pass and the same model trained for 1 step cannot: the gold
# answers' perplexity must not get worse than the champion's (and a latency budget).
GATES = ("gates.checks={perplexity: {kind: vs_champion, metric: perplexity, max_regression: 0.0}, "
         "exact_match: {kind: vs_champion, metric: exact_match, max_regression: 0.02}, "
         "latency: {kind: budget, metric: latency_p95_ms, max: 120000}}")
ENFORCE = ["--set", "promote.mode=enforce", "--set", GATES]
ENV = {"LLMOPS_ACTOR": "release-bot", "COLUMNS": "200"}


@dataclass
class Run:
    project: Path
    stdout: str
    stderr: str
    returncode: int


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Run:
    """The whole default pipeline, once, as a user runs it: it ends with the champion live on
    an endpoint the deploy stage started (on a free port; stopped at the end of the session)."""
    project = make_project(tmp_path_factory.mktemp("shared") / "project",
                           {"stages": TRAINING + ["deploy"], "serve.port": free_port()})
    proc = run_cli(["run", *ENFORCE], cwd=project, **ENV)
    try:
        yield Run(project, proc.stdout, proc.stderr, proc.returncode)
    finally:
        run_cli(["serve", "stop"], cwd=project)


def copy_project(run: Run, dest: Path, values: dict | None = None) -> Path:
    """A copy of the shared run's project (state and outputs included) to change freely.
    The copy's MLflow experiment keeps the original's artifact folder (an absolute URI):
    new runs add their own artifacts there, nothing is overwritten. The copy's pipeline has no
    deploy stage and its endpoint port is free (``values`` may add either back): a run in it
    never reaches the shared run's endpoint, whose record and request log are not copied either."""
    shutil.copytree(run.project, dest, symlinks=True)
    for record in (dest / ".llmops" / "serving").glob("endpoint-*.json"):
        record.unlink()
    shutil.rmtree(dest / ".llmops" / "serving" / "requests", ignore_errors=True)  # the shared endpoint's traffic
    spec = dest / "pipelines.yaml"
    spec.write_text(set_keys(spec.read_text(), {"stages": TRAINING, "serve.port": free_port()} | (values or {})))
    return dest
