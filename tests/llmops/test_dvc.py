"""dvc.yaml: agrees with the spec; `dvc repro` runs the same stages and skips unchanged ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmops import dvcfile
from llmops.spec import load_spec
from llmops.stages import METRICS_FILE, STAGES as REGISTRY
from tests.conftest import PROJECT_FILES, REPO, copy_project, run_cli

STAGES = ("ingest", "validate", "features", "prepare", "finetune", "evaluate", "compress", "gates", "register",
          "promote")
CHEAP = STAGES[:4]  # the stages up to prepare: no model is trained


def test_committed_dvc_yaml_agrees_with_the_spec():
    spec = load_spec(REPO / "pipelines.yaml", env={})
    assert dvcfile.check(spec, REPO / "dvc.yaml") == []
    proc = run_cli(["dvc", "check"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_check_reports_each_disagreement(tmp_path):
    spec = load_spec(REPO / "pipelines.yaml", env={})
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    doc["stages"]["prepare"]["cmd"] = "python prepare.py"
    del doc["stages"]["ingest"]
    doc["stages"]["extra"] = {"cmd": "true"}
    broken = tmp_path / "dvc.yaml"
    broken.write_text(yaml.safe_dump(doc))
    problems = dvcfile.check(spec, broken)
    assert problems == sorted([
        f"{broken}: stage 'ingest' is in the spec but not in dvc.yaml",
        f"{broken}: stage 'extra' is not a stage of the spec's default pipeline",
        f"{broken}: stages.prepare.cmd is 'python prepare.py', expected 'llmops stage prepare'",
    ])


def test_folders_ingest_adds_are_its_deps_so_new_labelled_data_reruns_it():
    spec = load_spec(REPO / "pipelines.yaml", ["ingest.extra=[data/traffic, s3://labels/2026]"], env={})
    deps = dvcfile.build(spec)["stages"]["ingest"]["deps"]
    plain = dvcfile.build(load_spec(REPO / "pipelines.yaml", env={}))["stages"]["ingest"]["deps"]
    assert deps == plain + ["data/traffic"]  # S3 data is not DVC's to track


def test_stage_params_are_only_the_keys_it_reads():
    doc = dvcfile.build(load_spec(REPO / "pipelines.yaml", env={}))
    # a stage's section, the other keys it reads, and the catalog entries of the models they name
    assert doc["stages"]["prepare"]["params"] == [{"pipelines.yaml": [
        "pipelines.support-triage.prepare", "pipelines.support-triage.task", "pipelines.support-triage.features",
        "models.all-minilm-l6-v2"]}]
    assert "artifacts/support-triage/validate/tickets.parquet" in doc["stages"]["prepare"]["deps"]
    assert doc["stages"]["validate"]["params"] == [{"pipelines.yaml": [
        "pipelines.support-triage.validate", "pipelines.support-triage.task.answer",
        "pipelines.support-triage.prepare.split", "pipelines.support-triage.prepare.split_salt",
        "pipelines.support-triage.prepare.test_only", "models.smollm2-135m-instruct"]}]  # its token-length check counts with the base model's tokenizer
    assert doc["stages"]["finetune"]["params"] == [{"pipelines.yaml": ["pipelines.support-triage.finetune",
                                                                       "models.smollm2-135m-instruct"]}]
    assert {"artifacts/support-triage/validate/validation.json": {"cache": False}} in doc["stages"]["validate"]["metrics"]


def _write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_code_deps_follow_imports_transitively(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/stage.py": "import json\nfrom pkg import direct\n\ndef run():\n    from pkg.lazy import f\n",
        "pkg/direct.py": "from . import sub\nfrom .helpers.deep import g\n",
        "pkg/sub.py": "import pkg.util.tool as t\n",
        "pkg/util/__init__.py": "",
        "pkg/util/tool.py": "import os\n",
        "pkg/helpers/__init__.py": "from ..other import x\n",
        "pkg/helpers/deep.py": "from .. import base\n",
        "pkg/base.py": "",
        "pkg/lazy.py": "",
        "pkg/other.py": "",
        "pkg/unused.py": "",
        "other_pkg/mod.py": "",
    })
    assert dvcfile.code_deps("pkg.stage", tmp_path) == [
        "pkg/__init__.py", "pkg/base.py", "pkg/direct.py", "pkg/helpers/__init__.py", "pkg/helpers/deep.py",
        "pkg/lazy.py", "pkg/other.py", "pkg/stage.py", "pkg/sub.py", "pkg/util/__init__.py", "pkg/util/tool.py"]


def test_code_deps_of_a_stage_that_is_a_package(tmp_path):
    _write(tmp_path, {
        "comp/__init__.py": "",
        "comp/shared.py": "",
        "comp/big/__init__.py": "from .core import run\n",
        "comp/big/core.py": "from comp import shared\n",
        "comp/big/notes.py": "",
    })
    assert dvcfile.code_deps("comp.big", tmp_path) == [
        "comp/__init__.py", "comp/big/__init__.py", "comp/big/core.py", "comp/shared.py"]


def test_stage_code_deps_include_modules_imported_only_transitively():
    # finetune imports components.training, which imports components.tracking; and
    # components.lm, which imports components.catalog: neither is named in finetune.py.
    deps = dvcfile.stage_code("finetune")
    source = (REPO / "components" / "finetune.py").read_text()
    assert "components.tracking" not in source.replace("from components import tracking", "")
    assert "components/training.py" in deps and "components/lm.py" in deps and "components/catalog.py" in deps
    # an edit to the shared task module reaches every stage that builds, parses or scores answers
    for stage in ("validate", "prepare", "evaluate", "compress", "gates", "register"):
        assert "components/task.py" in dvcfile.stage_code(stage), stage
    assert "components/task.py" not in dvcfile.stage_code("ingest")
    for stage in REGISTRY:
        assert "components/base.py" in dvcfile.stage_code(stage)
        assert "llmops/cli.py" not in dvcfile.stage_code(stage) and "llmops/spec.py" not in dvcfile.stage_code(stage)
    assert {"feature_repo/definitions.py", "feature_repo/feature_store.yaml"} <= set(dvcfile.stage_code("features"))


def test_dvc_yaml_code_deps_are_derived_sorted_and_copied_by_the_project_fixture():
    doc = dvcfile.build(load_spec(REPO / "pipelines.yaml", env={}))
    for stage, definition in doc["stages"].items():
        code = [d for d in definition["deps"] if not d.startswith("artifacts/")]
        assert code == dvcfile.stage_code(stage) == sorted(code), stage
        for path in code:  # the integration tests' project copy must hold every dep
            assert (REPO / path).is_file(), path
            assert any(path == f or path.startswith(f + "/") for f in PROJECT_FILES), path


def test_each_stage_declares_the_files_it_reads_from_every_input_stage():
    for name, stage in REGISTRY.items():
        assert set(stage.input_files) == {*stage.needs, *stage.optional}, name
        for need, files in stage.input_files.items():
            readable = {*REGISTRY[need].outputs, METRICS_FILE}
            assert files and set(files) <= readable, (name, need, set(files) - readable)


def test_report_only_outputs_are_not_deps_of_later_stages():
    doc = dvcfile.build(load_spec(REPO / "pipelines.yaml", env={}))["stages"]
    folder = "artifacts/support-triage"
    for later in ("features", "prepare"):
        assert f"{folder}/validate/data_docs" not in doc[later]["deps"]
        assert f"{folder}/validate/metrics.json" not in doc[later]["deps"]
        assert f"{folder}/validate/quarantine.jsonl" not in doc[later]["deps"]
    assert f"{folder}/validate/articles.parquet" in doc["features"]["deps"]
    assert f"{folder}/features/article_embeddings.parquet" in doc["prepare"]["deps"]
    plotted = {f"{folder}/{s}/{f}" for s, d in REGISTRY.items() for plot in d.plots for f in plot}
    reports = {f"{folder}/{s}/{f}" for s, d in REGISTRY.items() for f in d.outputs
               if f.endswith((".md", ".png")) or f == "data_docs"}
    assert f"{folder}/compress/quality_vs_speed.png" in reports and f"{folder}/evaluate/report.md" in reports
    for stage, definition in doc.items():
        assert not set(definition["deps"]) & (plotted | reports), stage
    # a stage's report (metrics.json) is a dep only where a later stage reads it
    assert [d for d in doc["gates"]["deps"] if d.endswith(METRICS_FILE)] == [
        f"{folder}/evaluate/metrics.json", f"{folder}/compress/metrics.json"]
    assert [d for d in doc["register"]["deps"] if d.endswith(METRICS_FILE)] == [
        f"{folder}/prepare/metrics.json", f"{folder}/finetune/metrics.json", f"{folder}/evaluate/metrics.json",
        f"{folder}/compress/metrics.json", f"{folder}/gates/metrics.json"]
    assert [d for d in doc["promote"]["deps"] if d.startswith(folder)] == [
        f"{folder}/gates/metrics.json", f"{folder}/register/metrics.json"]
    for stage in ("validate", "features", "prepare", "finetune", "evaluate", "compress"):
        assert not [d for d in doc[stage]["deps"] if d.endswith(METRICS_FILE)], stage


@pytest.mark.integration
def test_repro_of_the_shared_run_skips_unchanged_and_reruns_what_changed(pipeline_run, tmp_path):
    """The shared pipeline run, recorded by DVC (`dvc commit`): nothing re-runs; a model stage
    forced to re-run goes through `llmops stage`; a parameter re-runs exactly its stages."""
    project = copy_project(pipeline_run, tmp_path / "project")
    commit = run_cli(["commit", "-f"], cwd=project, tool="dvc")
    assert commit.returncode == 0, commit.stdout + commit.stderr
    second = run_cli(["repro"], cwd=project, tool="dvc")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout
    # the training curve, the confusion matrix and compression quality vs speed render as DVC plots
    plots = run_cli(["plots", "show", "--json"], cwd=project, tool="dvc")
    assert plots.returncode == 0, plots.stderr
    shown = json.loads(plots.stdout)
    assert "errors" not in shown, shown.get("errors")
    for name in ("finetune/train_log.csv", "evaluate/confusion.csv", "compress/quality_speed.csv"):
        plot = next(v for k, v in shown["data"].items() if k.endswith(name))
        assert plot[0]["content"]["data"]["values"], name  # rendered from the stage's rows
    shown_metrics = run_cli(["metrics", "show", "--json"], cwd=project, tool="dvc")
    assert "exact_match" in shown_metrics.stdout and "size_mib" in shown_metrics.stdout
    out = project / "artifacts" / "support-triage"
    evaluated = (out / "evaluate" / "metrics.json").stat().st_mtime_ns
    model_stage = run_cli(["repro", "-f", "-s", "evaluate"], cwd=project, tool="dvc")
    assert model_stage.returncode == 0, model_stage.stdout + model_stage.stderr
    assert "Running stage 'evaluate'" in model_stage.stdout and "Running stage 'finetune'" not in model_stage.stdout
    assert (out / "evaluate" / "metrics.json").stat().st_mtime_ns > evaluated

    # Parameter changes, reproduced up to prepare (the stages after it would re-run as well,
    # and cost the most). A prompt parameter re-runs prepare only.
    spec = project / "pipelines.yaml"
    spec.write_text(spec.read_text().replace("| plan: {plan}", "| tier: {plan}"))
    prompt = run_cli(["repro", "prepare"], cwd=project, tool="dvc")
    assert prompt.returncode == 0, prompt.stderr
    assert "Stage 'validate' didn't change, skipping" in prompt.stdout
    assert "Stage 'features' didn't change, skipping" in prompt.stdout
    assert "Running stage 'prepare'" in prompt.stdout
    status = run_cli(["status", "--json"], cwd=project, tool="dvc")
    assert {"finetune", "evaluate", "compress", "gates", "register"} <= set(json.loads(status.stdout))

    # The split salt is read by validate too (leakage check), so both re-run.
    spec.write_text(spec.read_text().replace("split_salt: tessera-v1", "split_salt: tessera-v2"))
    third = run_cli(["repro", "prepare"], cwd=project, tool="dvc")
    assert third.returncode == 0, third.stderr
    assert "Stage 'ingest' didn't change, skipping" in third.stdout
    assert "Running stage 'validate'" in third.stdout and "Running stage 'prepare'" in third.stdout

    # An embedding setting re-runs features and prepare, not validate.
    spec.write_text(spec.read_text().replace("top_k: 3 ", "top_k: 4 "))
    topk = run_cli(["repro", "prepare"], cwd=project, tool="dvc")
    assert topk.returncode == 0, topk.stderr
    assert "Stage 'validate' didn't change, skipping" in topk.stdout
    assert "Running stage 'features'" in topk.stdout and "Running stage 'prepare'" in topk.stdout
    assert json.loads((out / "prepare" / "metrics.json").read_text())["retrieval_top_k"] == 4

    # An ingest parameter re-runs ingest and everything after it.
    spec.write_text(spec.read_text().replace("seed: 7 ", "seed: 8 "))
    fourth = run_cli(["repro", "prepare"], cwd=project, tool="dvc")
    assert fourth.returncode == 0, fourth.stderr
    assert "Running stage 'ingest'" in fourth.stdout and "Running stage 'prepare'" in fourth.stdout


@pytest.mark.integration
def test_repro_stops_at_validate_on_bad_data(project, demo_small):
    from tests.flows.test_pipeline_flow import write_bad_dataset

    bad = write_bad_dataset(project / "incoming", demo_small)
    spec = project / "pipelines.yaml"
    text = spec.read_text()
    start = text.index("        kind: generate")
    end = text.index("        unseen_share:")  # the generator's last key
    spec.write_text(text[:start] + f"        kind: files\n        uri: {bad}\n" + text[text.index("\n", end) + 1:])
    proc = run_cli(["repro"], cwd=project, tool="dvc")
    assert proc.returncode != 0
    assert "Running stage 'ingest'" in proc.stdout and "Running stage 'validate'" in proc.stdout
    for later in ("features", "prepare", "finetune"):
        assert f"Running stage '{later}'" not in proc.stdout
    assert ("validation failed: 3 error-level expectation(s): labels on intent, coverage on customer_id+created_at, "
            "references on customer_id") in proc.stderr
    assert not (project / "artifacts" / "support-triage" / "prepare").exists()


def _changed(project) -> set[str]:
    """The stages up to prepare that `dvc status` says would re-run."""
    proc = run_cli(["status", "--with-deps", "--json", "prepare"], cwd=project, tool="dvc")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return set(json.loads(proc.stdout))


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A small project after `dvc repro prepare`, shared by the tests below (each leaves it
    as it found it: everything up to prepare up to date)."""
    from tests.conftest import make_project

    project = make_project(tmp_path_factory.mktemp("dvc") / "project")
    first = run_cli(["repro", "prepare"], cwd=project, tool="dvc")
    assert first.returncode == 0, first.stdout + first.stderr
    return project


@pytest.mark.integration
def test_status_lists_the_stages_an_edited_module_reaches(reproduced):
    project = reproduced
    assert _changed(project) == set()
    code = {stage: dvcfile.stage_code(stage) for stage in CHEAP}
    users = {path: {s for s in CHEAP if path in code[s]} for deps in code.values() for path in deps}
    assert users["components/base.py"] == set(CHEAP)  # imported by every stage
    some = sorted(path for path, stages in users.items() if len(stages) < len(CHEAP))
    assert "components/generate.py" in some and "components/featurestore.py" in some
    for path in ["components/base.py", *some, "components/finetune.py"]:  # finetune.py: no cheap stage's code
        source = project / path
        original = source.read_text()
        source.write_text(original + "# edited\n")
        assert _changed(project) == users.get(path, set()), path
        source.write_text(original)
    assert _changed(project) == set()


@pytest.mark.integration
def test_rerunning_validate_on_the_same_input_reruns_nothing_after_it(reproduced):
    project = reproduced
    assert _changed(project) == set()
    validated = project / "artifacts" / "support-triage" / "validate"
    before = {p.relative_to(validated): p.read_bytes() for p in validated.rglob("*") if p.is_file()}
    again = run_cli(["repro", "-f", "-s", "validate"], cwd=project, tool="dvc")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Running stage 'validate'" in again.stdout
    after = {p.relative_to(validated): p.read_bytes() for p in validated.rglob("*") if p.is_file()}
    # the tables are byte-identical; the Data Docs (for people, not a dep) are not
    for table in ("tickets", "customers", "customer_profiles", "articles"):
        assert after[Path(f"{table}.parquet")] == before[Path(f"{table}.parquet")], table
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert any(k.parts[0] == "data_docs" for k in changed), changed
    rest = run_cli(["repro", "prepare"], cwd=project, tool="dvc")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert "Running stage" not in rest.stdout
    for stage in CHEAP:
        assert f"Stage '{stage}' didn't change, skipping" in rest.stdout
