"""`llmops serve` as a user runs it, and what it refuses to load."""
from __future__ import annotations

import shutil
import signal

import httpx
import pytest

from components.catalog import ModelError
from serving.model import ModelRef, load_folder
from tests.conftest import REPO, run_cli
from tests.serving.conftest import NAME, free_port, register_run, serve_cli, sqlite_registry


def serve_args(champion, tmp_path, *extra: str) -> list[str]:
    return ["serve", "--file", str(REPO / "pipelines.yaml"),
            "--set", f"services.mlflow.tracking_uri={champion['uri']}",
            "--set", f"services.storage.state_dir={tmp_path / 'state'}", *extra]


def test_serve_starts_prints_what_it_serves_and_answers(champion, tmp_path):
    port = free_port()
    # no --model: the pipeline's register.model_name at champion
    args = serve_args(champion, tmp_path, "--port", str(port), "--set", f"register.model_name={NAME}")
    proc = serve_cli(args, tmp_path, port)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == f"{NAME}/1"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": f"{NAME}@champion", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)  # as systemd or Kubernetes stop it: a clean shutdown, log flushed
        _, err = proc.communicate(timeout=60)
    assert f"stopped serving {NAME}/1; request log: 1 written, 0 dropped" in err, err
    assert f"serving {NAME}/1 ({NAME}@champion, base+adapter) loaded in" in err
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in err and "API keys: none needed" in err
    assert "Traceback" not in err
    # no features were ever built in this state folder: triage says so, no feature server starts
    assert "/v1/triage: triage is unavailable: no Feast registry in" in err
    assert not (tmp_path / "state" / "feast" / "support-triage" / "server.json").exists()


@pytest.mark.parametrize("model, message", [
    (f"{NAME}@nope", f"{NAME} has no alias 'nope'"),
    (f"{NAME}/7", f"{NAME} has no version 7 (versions: 1)"),
    ("no-such-model", "no registered model 'no-such-model'"),
])
def test_serve_refuses_what_the_registry_does_not_hold(champion, tmp_path, model, message):
    proc = run_cli(serve_args(champion, tmp_path, "--model", model), cwd=tmp_path)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_serve_refuses_short_keys(champion, tmp_path):
    proc = run_cli(serve_args(champion, tmp_path), cwd=tmp_path, LLMOPS_API_KEYS="ci:short")
    assert proc.returncode == 2 and "$LLMOPS_API_KEYS: entry 1 (ci): a key must have at least 16 characters" \
        in proc.stderr


def test_an_altered_file_is_refused(served, tmp_path):
    folder = shutil.copytree(served.folder, tmp_path / "version")
    weights = folder / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"adapter_model.safetensors: SHA-256 .* does not match the recorded"):
        load_folder(folder, {}, tmp_path / "state")


def test_model_references():
    assert ModelRef.parse("m@champion") == ModelRef("m", alias="champion")
    assert ModelRef.parse("m/3") == ModelRef("m", number=3) and str(ModelRef.parse("m/3")) == "m/3"
    assert ModelRef.parse("m") == ModelRef("m", alias="champion")
    with pytest.raises(ValueError, match="expected name/<version number>"):
        ModelRef.parse("m/latest")


def test_a_version_of_another_registry_is_fetched_again(tiny_run, tmp_path):
    """Version numbers are per registry: a state folder that holds version 1 of one registry
    (the embedded store) fetches version 1 of another (a server) again, never serves the copy."""
    import json

    import mlflow

    from serving.model import MANIFEST, SOURCE, fetch

    cache, fetched = tmp_path / "versions", []
    for commit in ("embedded", "server"):
        with sqlite_registry(tmp_path / commit):
            register_run(tiny_run, tmp_path / commit / "register", "twin", context={"git_commit": commit})
            source = mlflow.MlflowClient().get_model_version("twin", "1").source
            number, folder = fetch(ModelRef.parse("twin/1"), cache)
            written = (folder / MANIFEST).stat().st_mtime_ns
            assert fetch(ModelRef.parse("twin/1"), cache) == (1, folder)  # the same registry's copy is reused
            assert (folder / MANIFEST).stat().st_mtime_ns == written
        fetched.append((folder, json.loads((folder / MANIFEST).read_text())["git_commit"], source))
    assert [commit for _, commit, _ in fetched] == ["embedded", "server"]
    assert {folder for folder, _, _ in fetched} == {cache / "twin" / "1"}
    assert (cache / "twin" / "1" / SOURCE).read_text() == fetched[1][2]
