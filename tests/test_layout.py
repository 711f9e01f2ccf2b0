"""The layout rules the project is built on, checked on the source itself."""
from __future__ import annotations

import ast
from pathlib import Path

from llmops.stages import STAGES
from tests.conftest import REPO

MAX_LINES = 400  # a module over this says why at its top ("Long because ...")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _stage_files(name: str) -> list[Path]:
    single = REPO / "components" / f"{name}.py"
    return [single] if single.exists() else sorted((REPO / "components" / name).rglob("*.py"))


def test_components_never_import_prefect_or_dvc():
    offenders = {str(p.relative_to(REPO)): sorted(n for n in _imports(p) if n.split(".")[0] in
                                                  {"prefect", "dvc", "flows", "llmops"})
                 for p in (REPO / "components").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_stage_module_imports_another_stage():
    """What two stages (or a stage and the endpoint) need lives in a shared module."""
    offenders = {}
    for name in STAGES:
        others = {f"components.{o}" for o in STAGES if o != name}
        for path in _stage_files(name):
            bad = sorted(n for n in _imports(path) if n in others or any(n.startswith(o + ".") for o in others))
            if bad:
                offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}


def test_modules_stay_small_or_say_why():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in [*(REPO / "components").rglob("*.py"),
                                                          *(REPO / "llmops").rglob("*.py"), *(REPO / "flows").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES and "Long because" not in p.read_text()[:3000]]
    assert long == []


def test_top_level_layout():
    for name in ("flows", "components", "pipelines.yaml", "dvc.yaml", "feature_repo", "README.md",
                 "pyproject.toml", "tests", "infra", "bench", ".ci/run", "Makefile", "docs"):
        assert (REPO / name).exists(), name


def test_every_stage_has_its_module_and_tests():
    for name, stage in STAGES.items():
        assert _stage_files(name), name
        assert (REPO / "tests" / "components" / f"test_{name}.py").exists(), name
        assert stage.run.__module__ == f"components.{name}"


def test_feature_repo_holds_only_feast_definitions():
    # `feast apply` imports every .py file in the repo folder
    assert sorted(p.name for p in (REPO / "feature_repo").glob("*.py")) == ["definitions.py"]
