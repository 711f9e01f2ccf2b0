"""Shared fixtures: small generated data, and throwaway copies of the project for
integration tests that run the real CLI, Prefect and DVC."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components import generate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Files a project copy needs: the spec, the DVC pipeline, and the code DVC tracks as deps.
PROJECT_FILES = ("pipelines.yaml", "dvc.yaml", ".dvcignore", ".dvc/config", "components", "feature_repo")


@pytest.fixture(scope="session")
def demo_small() -> generate.DemoData:
    """300 tickets from 60 customers: big enough for every split, fast to build."""
    return generate.generate(n_tickets=300, n_customers=60, seed=3)


def build_features_and_prepare(root: Path, data: generate.DemoData, prepare_cfg=None, features_cfg=None,
                               task=None):
    """Run the features and prepare stages on ``data`` (as validated tables) with a copy of
    feature_repo/ and a state folder under ``root``; returns (features result, prepare result, io)."""
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
    common = dict(pipeline="t", state_dir=root / "state", models=dict(spec.models), feature_repo=repo)
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


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's spec, dvc.yaml and components in a new git repo, with the
    demo cut to 300 tickets, fine-tuning to 2 steps of 2 chats on the real base model and
    compression to one ONNX variant measured on 4 chats. Such a model cannot pass the shipped
    gates, so promotion runs in ``warn`` mode (tests of enforcement set it back) and the
    behavioural and safety probes use 1 test chat (17 probe chats in all)."""
    dest = tmp_path / "project"
    dest.mkdir()
    for name in PROJECT_FILES:
        src = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    spec = dest / "pipelines.yaml"
    text = spec.read_text()
    assert "n_tickets: 2000" in text
    for old, new in (("n_tickets: 2000", "n_tickets: 300"), ("max_steps: 300 ", "max_steps: 2 "),
                     ("      batch_size: 4 ", "      batch_size: 2 "), ("eval_examples: 48 ", "eval_examples: 4 "),
                     ("max_examples: null ", "max_examples: 6 "), ("latency_requests: 16 ", "latency_requests: 2 "),
                     # compress: only the weight-only int8 variant (and merged, onnx, its parents), 4 chats
                     ("variants: [merged, onnx, int8_dynamic, int8_static, int8_weight, int4_weight, pruned, distilled]",
                      "variants: [int8_weight]"), ("examples: null ", "examples: 4 "),
                     ("latency_requests: 8 ", "latency_requests: 2 "), ("forward_repeats: 10 ", "forward_repeats: 2 "),
                     ("probe_examples: 8 ", "probe_examples: 1 "), ("mode: enforce ", "mode: warn ")):
        assert old in text, old
        text = text.replace(old, new)
    spec.write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    # Models are provisioned state (as `make setup` leaves it): share the repo's.
    (dest / ".llmops").mkdir()
    (dest / ".llmops" / "models").symlink_to(provisioned_models())
    return dest


def provisioned_models() -> Path:
    """The repo's provisioned model folder, pulling the base model first if needed."""
    from components.catalog import pull
    from llmops.spec import load_spec

    spec = load_spec(REPO / "pipelines.yaml", env={})
    pull("smollm2-135m-instruct", spec.models["smollm2-135m-instruct"], spec.state_dir(REPO))
    return spec.state_dir(REPO) / "models"
