"""The feature server: the one process that owns the embedded online store.

Milvus Lite holds an exclusive lock on its folder, so two processes cannot open the same
online store (the second fails with ``Open local milvus failed``). When the endpoint, a
pipeline run and monitoring must use the stores at the same time, one process, this
server, opens the store and serves Feast's feature server API on 127.0.0.1
(``/get-online-features``, ``/search``, ``/materialize``, ...) plus ``/llmops/apply``
(`feast apply` in the owner); every other process uses :class:`RemoteOnline`.

    llmops features serve      starts it in the background; pid, URL and log are recorded
                               in <state>/feast/<pipeline>/server.json
    llmops features status     says whether it runs, where, since when
    llmops features stop       stops it

The registry allows reads while a view materializes (feature_store.yaml:
``serve_features_while_materializing``), so the endpoint keeps answering during a
materialization. Scaled out, ``services.feast.url`` names a feature server in front of an
online store that is a real server (Redis, a Milvus cluster): the same client is used,
and `feast apply` runs in the process that asks for it.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from components import background
from components.featurestore import (ARTICLE_KEY, FeatureStoreUnavailable, LocalOnline, apply_here, feast_state,
                                     open_store)

URL_ENV = "LLMOPS_FEATURE_SERVER"  # services.feast.url, exported by the CLI
RECORD = "server.json"
REGISTRY_TTL_S = 5  # how soon the server sees a registry change made by another process
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the client

class RemoteOnline:
    """The online store through a feature server's HTTP API. ``owner``: the server is this
    project's (it can run `feast apply` for the store it owns)."""

    def __init__(self, url: str, owner: bool, state_dir: Path, pipeline: str, timeout_s: float = 10.0):
        self.url, self.owner, self.state_dir, self.pipeline = url.rstrip("/"), owner, state_dir, pipeline
        self.where = f"through the feature server at {self.url}"
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s)

    def _post(self, path: str, body: dict, timeout_s: float | None = None) -> dict:
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        for attempt in (1, 2):  # after a 5xx Feast's server drops the keep-alive connection: retry once
            try:
                r = self.client.post(path, json=body, timeout=timeout)
            except httpx.TransportError as exc:
                if attempt == 2:
                    raise FeatureStoreUnavailable(f"the feature server at {self.url} is unreachable "
                                                  f"({type(exc).__name__}: {exc}); start it with `llmops "
                                                  "features serve` or check services.feast.url") from None
                continue
            if r.status_code < 400:
                return r.json() if r.content else {}
            if r.status_code < 500 or attempt == 2:
                detail = r.text[:300].strip()
                raise FeatureStoreUnavailable(f"the feature server at {self.url} answered {path} with "
                                              f"{r.status_code}: {detail}")
        raise AssertionError("unreachable")

    def read(self, entity_rows, features=None, service=None):
        keys = list(entity_rows[0]) if entity_rows else []
        body = {"entities": {k: [row[k] for row in entity_rows] for k in keys}}
        body |= {"feature_service": service} if service else {"features": list(features or [])}
        return _columns(self._post("/get-online-features", body))

    def search(self, feature, vector, top_k):
        out = _columns(self._post("/search", {"features": [feature], "query": list(vector), "top_k": top_k,
                                              "api_version": 2, "distance_metric": "COSINE"}))
        return [str(a) for a in out.get(ARTICLE_KEY, [])]

    def materialize(self, start, end, views=None):
        if start is None:
            self._post("/materialize-incremental", {"end_ts": end.isoformat(), "feature_views": views},
                       timeout_s=3600)
        else:
            self._post("/materialize", {"start_ts": start.isoformat(), "end_ts": end.isoformat(),
                                        "feature_views": views}, timeout_s=3600)

    def apply(self, repo):
        if not self.owner:  # an online store that is a real server: apply from here
            apply_here(open_store(repo, self.state_dir, self.pipeline, require_registry=False), repo)
            return
        self._post("/llmops/apply", {}, timeout_s=600)  # the server applies the repository it serves

    def close(self) -> None:
        self.client.close()

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            return self.client.get("/health", timeout=timeout_s).status_code == 200
        except httpx.TransportError:
            return False


def _columns(payload: dict) -> dict[str, list]:
    """Feast's response (``metadata.feature_names`` + one ``results`` entry per name) as
    name -> values, like ``OnlineResponse.to_dict()``."""
    names = payload.get("metadata", {}).get("feature_names", [])
    return {name: result["values"] for name, result in zip(names, payload.get("results", []))}


def remote(state_dir: Path, pipeline: str) -> RemoteOnline | None:
    """The feature server this process should use: $LLMOPS_FEATURE_SERVER (services.feast.url),
    else the one recorded for this state folder if it runs; None: open the store here."""
    url = os.environ.get(URL_ENV)
    if url:
        return RemoteOnline(url, False, state_dir, pipeline)
    record = running(state_dir, pipeline)
    return RemoteOnline(record["url"], True, state_dir, pipeline) if record else None


# ---------------------------------------------------------------- the process

def record_path(state_dir: Path, pipeline: str) -> Path:
    return feast_state(state_dir, pipeline) / RECORD


def running(state_dir: Path, pipeline: str) -> dict | None:
    """The recorded server if its process is alive (a stale record is removed)."""
    return background.read_record(record_path(state_dir, pipeline))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _start_lock(state: Path):
    """One start at a time per state folder (an endpoint and a pipeline may both ask)."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "server.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start(repo: Path, state_dir: Path, pipeline: str, host: str = "127.0.0.1", port: int = 0,
          timeout_s: float = 180.0) -> tuple[dict, bool]:
    """Start the feature server in the background (or find the running one); returns (its
    record, started now). FeatureStoreUnavailable says why when it does not come up."""
    state = feast_state(state_dir, pipeline)
    with _start_lock(state):
        record = running(state_dir, pipeline)
        if record is not None:
            return record, False
        port = port or _free_port(host)
        log = state / "server.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "components.featureserver", "--repo", str(repo), "--state-dir",
                 str(state_dir), "--pipeline", pipeline, "--host", host, "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                start_new_session=True)  # outlives the command that started it
        url = f"http://{host}:{port}"
        client = RemoteOnline(url, True, state_dir, pipeline)
        deadline = time.monotonic() + timeout_s
        while not client.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                raise FeatureStoreUnavailable(_why_not(log, state, timeout_s, proc.returncode))
            time.sleep(0.25)
        record = {"pid": proc.pid, "url": url, "host": host, "port": port, "repo": str(repo), "log": str(log),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        record_path(state_dir, pipeline).write_text(json.dumps(record, indent=1))
        return record, True


def _why_not(log: Path, state: Path, timeout_s: float, code: int | None) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    if "DataDirLockedError" in text or "holds the lock" in text:
        return (f"the online store {state / 'online_store.db'} is open in another process (a pipeline run's "
                "features or prepare stage, or `llmops features materialize`); start the feature server "
                "when it has finished, or before the pipeline (the pipeline then uses the server)")
    last = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])
    status = f"exited with code {code}" if code is not None else f"did not answer within {timeout_s:.0f} s"
    return f"the feature server {status}; its log {log}: {last or '(empty)'}"


def stop(state_dir: Path, pipeline: str, timeout_s: float = 30.0) -> dict | None:
    """Stop the recorded server (SIGTERM, then SIGKILL); returns its record, None if none ran."""
    return background.stop_recorded(record_path(state_dir, pipeline), timeout_s)


def serve(repo: Path, state_dir: Path, pipeline: str, host: str, port: int) -> None:
    """Run the server in this process until SIGTERM: open the store (taking its lock now, so
    a store in use elsewhere fails here, not at the first request), serve Feast's API."""
    import uvicorn
    from feast.feature_server import get_app

    store = open_store(repo, state_dir, pipeline, require_registry=False)
    local = LocalOnline(store)
    views = store.list_feature_views() if (feast_state(state_dir, pipeline) / "registry.db").exists() else []
    if views:  # the first read opens Milvus Lite and takes its lock
        key = views[0].entity_columns[0].name
        local.read([{key: "__llmops_probe__"}], features=[f"{views[0].name}:{views[0].features[0].name}"])
    app = get_app(store, registry_ttl_sec=REGISTRY_TTL_S)

    @app.post("/llmops/apply")
    def _apply() -> dict:
        """`feast apply` of ``repo`` (this server's repository) in the store's owner."""
        apply_here(store, repo)
        store.refresh_registry()
        return {"applied": str(repo), "feature_views": [v.name for v in store.list_feature_views()]}

    print(f"feature server for {feast_state(state_dir, pipeline)} on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m components.featureserver", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.repo, args.state_dir, args.pipeline, args.host, args.port)


if __name__ == "__main__":
    main()
