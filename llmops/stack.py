"""The local stack of `llmops up` / `llmops down` (`make up` / `make down`): a Prefect
server with the pipeline's deployments applied, a worker per process pool, the MLflow UI
and the endpoint serving the champion, all on 127.0.0.1, all in the background, each with a
record and a log under ``<state_dir>/stack/``. `up` twice starts nothing new; `down` stops
what `up` started. While the stack is up, `llmops run` and `llmops monitor` use its Prefect
server (unless services.prefect.api_url names another), so their runs show in its UI."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Callable

from components import background
from llmops.spec import Spec

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


def stack_dir(spec: Spec, root: Path) -> Path:
    return spec.state_dir(root) / "stack"


def running_prefect(state_dir: Path) -> str | None:
    """The API URL of the stack's Prefect server when it runs for this state folder."""
    record = background.read_record(state_dir / "stack" / "prefect-server.json")
    return record["api"] if record else None


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _worker_online(api: str, pool: str, worker: str) -> Callable[[], bool]:
    def check() -> bool:
        import httpx

        try:
            found = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=3).json()
        except (httpx.HTTPError, ValueError):
            return False
        return any(w.get("name") == worker and w.get("status") == "ONLINE" for w in found if isinstance(w, dict))
    return check


def _start(folder: Path, name: str, cmd: list[str], url: str, health: str | Callable[[], bool], timeout_s: float,
           say, env=None, cwd: Path | None = None, port: int | None = None, **extra) -> dict:
    """Start one part unless its record says it runs; returns its record with "state".
    ``health``: a URL that answers 200 once it is up, or a function saying so."""
    record = background.read_record(folder / f"{name}.json")
    if record is not None:
        return {**record, "state": "already running"}
    if port is not None and _port_taken(port):
        raise RuntimeError(f"{name}: port {port} on {HOST} is taken by another process; free it or choose "
                           f"another port (llmops up --help)")
    say(f"starting {name} ...")
    ready = health if callable(health) else (lambda: _answers(health))
    record = background.launch(cmd, folder / f"{name}.log", folder / f"{name}.json", ready, timeout_s, cwd=cwd,
                               env=env, url=url, **extra)
    return {**record, "state": "started"}


def up(spec: Spec, root: Path, spec_file: Path, pipeline: str, prefect_port: int = 4200, mlflow_port: int = 5000,
       serve: bool = True, say: Callable[[str], None] = print) -> list[dict]:
    """Bring the stack up (idempotent); returns one record per part with "name" and "state"."""
    from flows.deployments import apply

    folder = stack_dir(spec, root)
    state = spec.state_dir(root)
    parts = []
    api = f"http://{HOST}:{prefect_port}/api"
    env = {**os.environ, "PREFECT_HOME": str(state / "prefect")}
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another one
    parts.append(_start(folder, "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port",
                                                   str(prefect_port)], f"http://{HOST}:{prefect_port}", f"{api}/health",
                        300, say, env=env, port=prefect_port, api=api) | {"name": "prefect-server"})
    api = parts[-1]["api"]
    os.environ["PREFECT_API_URL"] = api
    say(f"applying the deployments of {pipeline} to {api}")
    apply(spec, root, spec_file, pipeline, say=say)
    worker_env = {**os.environ, "PREFECT_API_URL": api}
    for pool, cfg in spec.pipelines[pipeline].deployments.pools.items():
        if cfg.type != "process":
            say(f"work pool {pool} ({cfg.type}): its worker runs where that infrastructure is (infra/README.md)")
            continue
        name, worker = f"worker-{pool}", f"{pipeline}-{pool}"
        parts.append(_start(folder, name, [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", worker],
                            f"pool {pool}", _worker_online(api, pool, worker), 120, say, env=worker_env, cwd=root)
                     | {"name": name})
    tracking = os.environ["MLFLOW_TRACKING_URI"]
    if tracking.startswith("sqlite:"):
        parts.append(_start(folder, "mlflow-ui", [str(BIN / "mlflow"), "ui", "--backend-store-uri", tracking,
                                                  "--host", HOST, "--port", str(mlflow_port)],
                            f"http://{HOST}:{mlflow_port}", f"http://{HOST}:{mlflow_port}/health", 180, say,
                            port=mlflow_port) | {"name": "mlflow-ui"})
    else:
        say(f"MLflow: the tracking server {tracking} (services.mlflow.tracking_uri)")
    if serve:
        parts.append(_endpoint(spec, root, spec_file, pipeline, folder, say))
    return parts


def _endpoint(spec: Spec, root: Path, spec_file: Path, pipeline: str, folder: Path, say) -> dict:
    from components.registry import RegistryError
    from serving.model import ModelRef, find_version

    pipe = spec.pipelines[pipeline]
    wanted = pipe.serve.model or f"{pipe.register_.model_name}@champion"
    try:
        find_version(ModelRef.parse(wanted))
    except (RegistryError, ValueError) as exc:
        return {"name": "endpoint", "state": "not started", "url": "-", "reason": f"{exc}; run the pipeline first (make run)"}
    url = f"http://{HOST}:{pipe.serve.port}"
    return _start(folder, "endpoint", [str(BIN / "llmops"), "serve", "-f", str(spec_file.resolve()), "-p", pipeline],
                  url, f"{url}/health", 600, say, cwd=root, port=pipe.serve.port) | {"name": "endpoint"}


def down(spec: Spec, root: Path, say: Callable[[str], None] = print) -> list[str]:
    """Stop every part `up` started (the endpoint first, the Prefect server last)."""
    folder = stack_dir(spec, root)
    stopped = []
    names = ["endpoint", *sorted(p.stem for p in folder.glob("worker-*.json")), "mlflow-ui", "prefect-server"]
    for name in names:
        record = background.stop_recorded(folder / f"{name}.json", timeout_s=60)
        if record is not None:
            say(f"stopped {name} (pid {record['pid']}, {record.get('url', '')})")
            stopped.append(name)
    return stopped
