"""The layout rules the project is built on, checked on the source itself."""
from __future__ import annotations

import ast
from pathlib import Path

from llmops.stages import STAGES
from tests.conftest import REPO


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_components_never_import_prefect_or_dvc():
    offenders = {p.name: sorted(_imports(p) & {"prefect", "dvc", "flows", "llmops"})
                 for p in (REPO / "components").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_top_level_layout():
    for name in ("flows", "components", "pipelines.yaml", "dvc.yaml", "feature_repo", "README.md",
                 "pyproject.toml", "tests", "infra", "bench", ".ci/run", "Makefile"):
        assert (REPO / name).exists(), name


def test_every_stage_has_its_module_and_tests():
    for name, stage in STAGES.items():
        assert stage.run.__module__ == f"components.{name}", name
        assert ((REPO / "components" / f"{name}.py").exists()
                or (REPO / "components" / name / "__init__.py").exists()), name
        assert (REPO / "tests" / "components" / f"test_{name}.py").exists(), name


def test_feature_repo_holds_only_feast_definitions():
    # `feast apply` imports every .py file in the repo folder
    assert sorted(p.name for p in (REPO / "feature_repo").glob("*.py")) == ["definitions.py"]
