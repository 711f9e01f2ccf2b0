"""dvc.yaml from the spec and the stage registry, and the check that they agree.

Each pipeline stage becomes a DVC stage that runs ``llmops stage NAME``, tracks the
spec keys that stage reads (its section of pipelines.yaml) as params; as deps, its code
(every project source file its component module imports, directly or transitively,
found by parsing the source: :func:`code_deps`), the other files it declares and the
files it reads from the folders of the stages it needs (not their reports); its own
files as outs, its ``metrics.json`` as a (git-tracked, uncached) metrics file, and its
plot files (training loss curve, confusion matrix) as uncached plots with their axes.
"""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from llmops.spec import Spec
from llmops.stages import METRICS_FILE, STAGES

HEADER = ("# Generated from pipelines.yaml, the stage registry and the components' imports by\n"
          "# `llmops dvc generate`; `llmops dvc check` and the tests fail when they disagree.\n"
          "# Run the stages with `dvc repro` (venv activated).\n")
ROOT = Path(__file__).resolve().parents[1]  # the folder the project's packages (components, llmops) sit in


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of module ``name`` (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``)
    under ``root``; None when it is not there (the standard library, a dependency, or a
    namespace package, which has no file)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name the source of ``module`` (at ``path``) may import: anywhere in the
    file (inside functions too), relative imports resolved, and for ``from x import y`` both
    ``x`` and ``x.y`` (y may be a submodule; names that are not modules resolve to no file)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            prefix = []
            if node.level:  # relative: from the module's package, one level up per extra dot
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    continue  # beyond the top-level package: Python refuses it too
                prefix = parts[:len(parts) - node.level + 1]
            base = ".".join(prefix + ([node.module] if node.module else []))
            if base:
                names.update(_with_parents(base))
            names.update(f"{base}.{a.name}" if base else a.name for a in node.names if a.name != "*")
    return names


def code_deps(module: str, root: Path = ROOT) -> list[str]:
    """The project source files (paths relative to ``root``, sorted) that importing
    ``module`` runs: the module itself, its packages' ``__init__.py`` files, and everything
    they import from under ``root``, transitively."""
    found: set[Path] = set()
    todo = _with_parents(module)
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if path is None or path in found:
            continue
        found.add(path)
        todo.extend(imported_names(path, name))
    return sorted(p.relative_to(root).as_posix() for p in found)


def stage_code(stage: str, root: Path = ROOT) -> list[str]:
    """A stage's code deps: what its component module imports (:func:`code_deps`) and the
    other files it declares in the registry."""
    definition = STAGES[stage]
    return sorted({*code_deps(definition.run.__module__, root), *definition.extra_deps})


def catalog_models(spec: Spec, pipe, keys) -> list[str]:
    """The catalog entries named anywhere in the spec keys a stage reads (e.g. the base model
    in finetune.base_model): a new catalog entry for them re-runs the stage."""
    document = pipe.model_dump(mode="json", by_alias=True)
    found: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value in spec.models:
            found.add(value)

    for key in keys:
        node = document
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        walk(node)
    return sorted(found)


def build(spec: Spec, spec_file: str = "pipelines.yaml", pipeline: str | None = None) -> dict:
    """The dvc.yaml document for ``pipeline`` (default: the spec's default pipeline)."""
    name, pipe = spec.pipeline(pipeline)
    artifacts = Path(spec.services.storage.artifacts_dir) / name
    stages = {}
    for stage in pipe.stages:
        definition = STAGES[stage]
        folder = artifacts / stage
        plotted = {f for plot in definition.plots for f in plot}
        cmd = f"llmops stage {stage}" + ("" if name == spec.default_pipeline else f" -p {name}")
        deps = stage_code(stage)
        deps += [str(artifacts / need / f) for need in definition.inputs(pipe.stages)
                 for f in sorted(definition.input_files[need])]
        deps += definition.data_deps(pipe.section(stage)) if definition.data_deps else []
        stages[stage] = {
            "cmd": cmd,
            "deps": deps,
            "params": [{spec_file: [f"pipelines.{name}.{s}" for s in (stage, *definition.reads)]
                        + [f"models.{m}" for m in catalog_models(spec, pipe, (stage, *definition.reads))]}],
            "outs": [str(folder / f) for f in definition.outputs
                     if f not in definition.metrics and f not in plotted],
            "metrics": [{str(folder / m): {"cache": False}} for m in (METRICS_FILE, *definition.metrics)],
        }
        if definition.plots:
            stages[stage]["plots"] = [{str(folder / f): {"cache": False, **props}}
                                      for plot in definition.plots for f, props in plot.items()]
    return {"stages": stages}


def render(doc: dict) -> str:
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=100)


def check(spec: Spec, dvc_file: Path, spec_file: str = "pipelines.yaml") -> list[str]:
    """Differences between ``dvc_file`` and what the spec implies; [] when they agree."""
    expected = build(spec, spec_file)["stages"]
    if not dvc_file.exists():
        return [f"{dvc_file}: missing; run `llmops dvc generate`"]
    actual = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {})
    problems = []
    for stage in expected.keys() - actual.keys():
        problems.append(f"{dvc_file}: stage {stage!r} is in the spec but not in dvc.yaml")
    for stage in actual.keys() - expected.keys():
        problems.append(f"{dvc_file}: stage {stage!r} is not a stage of the spec's default pipeline")
    for stage in expected.keys() & actual.keys():
        for key, want in expected[stage].items():
            if actual[stage].get(key) != want:
                problems.append(f"{dvc_file}: stages.{stage}.{key} is {actual[stage].get(key)!r}, "
                                f"expected {want!r}")
    return sorted(problems)
