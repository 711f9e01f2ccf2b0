"""Fixtures of the endpoint tests: the tiny run registered and promoted to champion in a
SQLite registry of its own, loaded as serving loads it, and a live HTTP server on 127.0.0.1."""
from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest

from tests.conftest import (BIN, build_features_and_prepare, cli_env, free_port, make_project,  # noqa: F401
                            register_run, run_cli, sqlite_registry)

NAME = "triage-serve"


@pytest.fixture(scope="session")
def champion(tiny_run, tmp_path_factory):
    """The tiny run as version 1 of triage-serve, champion; the registry's URI and the state
    folder serving uses."""
    from components import registry

    work = tmp_path_factory.mktemp("serve-registry")
    with sqlite_registry(work) as uri:
        register_run(tiny_run, work / "register", NAME)
        registry.promote(registry.client(), NAME, 1, "the serving tests' champion")
    return {"uri": uri, "state": work / "state", "work": work}


@pytest.fixture(scope="session")
def served(champion):
    """The champion loaded as `llmops serve` loads it (fetched, hashes checked)."""
    from serving.model import ModelRef, load_version

    with sqlite_registry(champion["work"]):
        return load_version(ModelRef.parse(f"{NAME}@champion"), {}, champion["state"])


def samples(server) -> dict[str, float]:
    """The endpoint's Prometheus samples, ``name{labels}`` -> value. Compare two snapshots:
    once Feast is imported, prometheus_client keeps every process's values in shared files
    (Feast sets PROMETHEUS_MULTIPROC_DIR), so two apps in one process share their counters."""
    out = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def grew(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def serve_cli(args: list[str], cwd, port: int, timeout: float = 180.0, env: dict | None = None) -> subprocess.Popen:
    """``llmops ARGS`` (a `serve`) started in ``cwd`` (environment ``env``, default
    :func:`cli_env`), once it answers /health on ``port``; stop it with SIGINT and read its
    output with ``communicate``."""
    proc = subprocess.Popen([str(BIN / "llmops"), *args], cwd=cwd, env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"llmops serve exited {proc.returncode}: {proc.communicate()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"llmops serve did not answer /health within {timeout:.0f} s")
        time.sleep(0.5)


class LiveServer:
    """A real uvicorn server on 127.0.0.1 in a thread, for a real HTTP client."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_ready(self, timeout: float = 60.0) -> httpx.Response:
        """/ready once it no longer says the golden prompt is pending."""
        deadline = time.monotonic() + timeout
        while True:
            r = httpx.get(f"{self.url}/ready")
            if "not been answered yet" not in r.text or time.monotonic() > deadline:
                return r
            time.sleep(0.1)


def live_app(version, spec=None, keys: dict | None = None, start: bool = True, log=None, triage=None):
    """(LiveServer, engine) for ``version`` with an engine of its own (started unless ``start``
    is false; the caller stops it)."""
    from serving.app import create_app
    from serving.engine import Engine
    from serving.settings import ServeSpec

    spec = spec or ServeSpec()
    b = spec.batching
    engine = Engine(version.tokenizer, version.model, b.max_batch_size, b.max_wait_ms, b.max_queue)
    if start:
        engine.start()
    return LiveServer(create_app(version, engine, spec, keys, log, triage)), engine


@pytest.fixture
def serve_app(served):
    """Start an app with an engine of its own: ``serve_app(spec=..., keys=..., log=...)``
    returns a LiveServer (context manager); ``version=`` serves another ServedModel than the
    champion fixture (its ``model`` runs in the engine). Engines stop at teardown."""
    engines = []

    def make(spec=None, keys: dict | None = None, start: bool = True, log=None, version=None, triage=None):
        server, engine = live_app(version or served, spec, keys, start, log, triage)
        if start:
            engines.append(engine)
        return server

    yield make
    for engine in engines:
        engine.stop()


PIPELINE = "support-triage"


@pytest.fixture(scope="session")
def feature_project(demo_small, tmp_path_factory):
    """A small project whose state folder holds the Feast store that the features and
    prepare stages built from the small demo data, served by the feature server that
    `llmops features serve` starts (and `llmops features stop` stops at the end)."""
    project = make_project(tmp_path_factory.mktemp("triage") / "project")
    stages = project.parent / "stages"
    _, prepared, _ = build_features_and_prepare(stages, demo_small, pipeline=PIPELINE, state_dir=project / ".llmops")
    prepared.report.write(stages / "prepare")  # as the runner leaves it: the register stage reads it
    started = run_cli(["features", "serve"], cwd=project, check=True)
    yield {"project": project, "state": project / ".llmops", "prepare": stages / "prepare", "data": demo_small,
           "serve_stdout": started.stdout}
    stopped = run_cli(["features", "stop"], cwd=project)
    assert stopped.returncode == 0 and "stopped the feature server" in stopped.stdout, stopped.stdout + stopped.stderr


@pytest.fixture(scope="session")
def triage(feature_project, served):
    """The champion's prompt over the feature project's stores, through its feature server."""
    from components.featurestore import FeaturesSpec
    from llmops.spec import load_spec
    from serving.triage import open_triage
    from tests.conftest import REPO

    spec = load_spec(REPO / "pipelines.yaml", env={})
    found = open_triage(served.manifest, FeaturesSpec(), feature_project["project"] / "feature_repo",
                        feature_project["state"], PIPELINE, dict(spec.models), start_server=False)
    assert found.problem is None, found.problem
    return found


DRIFT = "drift-triage"


@pytest.fixture(scope="session")
def served_drift(tiny_run, feature_project, tmp_path_factory):
    """The tiny model registered as drift-triage/1 (champion) on the feature project's own
    prepared splits, in the project's MLflow store, loaded as `llmops serve` loads it."""
    from components import registry
    from components.base import StageIO
    from components.evaluate import EvaluateSpec
    from components.evaluate import run as evaluate
    from serving.model import ModelRef, load_version

    state, root, prepare = feature_project["state"], tmp_path_factory.mktemp("drift"), feature_project["prepare"]
    (root / "evaluate").mkdir()
    evaluated = evaluate(EvaluateSpec(batch_size=3, max_new_tokens=8, latency_requests=1, max_examples=3), StageIO(
        pipeline="t", out_dir=root / "evaluate", state_dir=tiny_run["root"] / "state",
        inputs={"prepare": prepare, "finetune": tiny_run["root"] / "finetune"},
        sections={"finetune": tiny_run["finetune"]}))
    evaluated.report.write(root / "evaluate")
    (state / "mlflow").mkdir(exist_ok=True)
    with sqlite_registry(state / "mlflow", experiment="support-triage"):
        register_run(tiny_run, root / "register", DRIFT, inputs={"prepare": prepare, "evaluate": root / "evaluate"})
        registry.promote(registry.client(), DRIFT, 1, "the drift monitoring test's champion")
        return load_version(ModelRef.parse(f"{DRIFT}@champion"), {}, state)


def _written(log, n: int, timeout_s: float = 30) -> None:
    """Wait until the log's writer has put ``n`` records on disk (it writes in the background)."""
    deadline = time.monotonic() + timeout_s
    while log.written < n:
        assert time.monotonic() < deadline, f"the request log wrote {log.written} of {n} records"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def drift_traffic(served_drift, triage, feature_project, tmp_path_factory):
    """Real HTTP traffic to drift-triage through /v1/triage, logged as `llmops serve` logs it:
    ``ordinary`` holds the held-out tickets of the feature project's data, ``shifted`` the
    same followed by as many Spanish tickets (the generator's language shift); ``n`` each."""
    import shutil

    from components import generate
    from components.splits import read_examples
    from serving.records import RequestLog
    from tests.serving.test_triage import ticket

    data, root = feature_project["data"], tmp_path_factory.mktemp("traffic")
    held_out = [e["ticket_id"] for split in ("validation", "test")
                for e in read_examples(feature_project["prepare"] / f"{split}.jsonl")]
    spanish = generate.generate(n_tickets=len(held_out), n_customers=60, seed=3, shift="language")
    for folder, tickets in (("ordinary", [ticket(data, t) for t in held_out]),
                            ("shifted", [ticket(spanish, t) for t in spanish.tickets.ticket_id])):
        if folder == "shifted":
            shutil.copytree(root / "ordinary", root / "shifted")
        log = RequestLog(root / folder)
        server, engine = live_app(served_drift, log=log, triage=triage)
        try:
            with server:
                for body in tickets:
                    r = httpx.post(f"{server.url}/v1/triage", json=body, timeout=120)
                    assert r.status_code == 200, r.text
                _written(log, len(tickets))
        finally:
            engine.stop()
            log.close()
    return {"ordinary": root / "ordinary", "shifted": root / "shifted", "n": len(held_out)}
