"""pipelines.yaml: the shipped spec, exact error messages, interpolation and overrides."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from llmops import spec as specmod
from llmops.spec import SpecError, interpolate, load_spec
from llmops.spec_errors import line_numbers
from tests.conftest import REPO, run_cli

SPEC = REPO / "pipelines.yaml"


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_shipped_spec_is_valid():
    spec = load_spec(SPEC, env={})
    name, pipe = spec.pipeline(None)
    assert name == "support-triage"
    assert pipe.stages == ["ingest", "validate", "features", "prepare", "finetune", "evaluate", "compress", "gates",
                           "register", "promote", "deploy"]
    assert spec.services.prefect.api_url is None  # ${PREFECT_API_URL:-} unset -> ephemeral
    assert set(spec.models) == {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def test_every_key_in_the_shipped_spec_has_a_comment():
    # A key is explained by a comment on its line or the line above; inside a stage, a commented
    # entry (a gate check, an answer field) explains the keys under it; a section whose keys are
    # all explained needs no comment of its own.
    text = SPEC.read_text()
    lines = text.splitlines()
    keys = {path: n for path, n in line_numbers(text).items() if not path[-1].isdigit()}

    def commented(n: int) -> bool:
        return "#" in lines[n - 1] or lines[n - 1].lstrip().startswith("- ") or lines[n - 2].strip().startswith("#")

    def explained(path: tuple[str, ...]) -> bool:
        if commented(keys[path]) or any(commented(keys[path[:i]]) for i in range(4, len(path))):
            return True
        children = [k for k in keys if len(k) == len(path) + 1 and k[:len(path)] == path]
        return bool(children) and all(explained(k) for k in children)

    undocumented = [f"{keys[p]}: {lines[keys[p] - 1].strip()}" for p in keys if not explained(p)]
    assert not undocumented, "keys without a comment:\n" + "\n".join(undocumented)


def test_error_names_file_line_key_and_value(tmp_path):
    bad = tmp_path / "pipelines.yaml"
    text = SPEC.read_text().replace("train: 0.8", "train: 0")
    bad.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(bad, env={})
    line = _line_of(text, "train: 0 ")
    assert str(err.value) == (f"{bad}:{line}: pipelines.support-triage.prepare.split.train: "
                              "must be > 0 (got 0)")


@pytest.mark.parametrize(("override", "expected"), [
    ("ingest.source.n_tickts=5",
     "pipelines.support-triage.ingest.source.n_tickts: unknown key; did you mean 'n_tickets'? (from --set)"),
    ("ingest.source.kind=ftp",
     "pipelines.support-triage.ingest.source: 'kind' must be one of 'generate', 'files' (got 'ftp')"),
    ("stages=[validate,ingest,prepare]",
     "pipelines.support-triage.stages: stage 'validate' needs ingest before it (from --set)"),
    ("stages=[ingest,validate,prepare]",
     "pipelines.support-triage.stages: stage 'prepare' needs features before it (from --set)"),
    ("stages=[ingest,validate,features,prepare,finetune,evaluate,register,compress]",
     "pipelines.support-triage.stages: stage 'register' reads compress when the pipeline has it, so it must come "
     "before (from --set)"),
    ("compress.variants=[merged,int3]", "pipelines.support-triage.compress.variants.1: must be 'merged', 'onnx', "
     "'int8_dynamic', 'int8_static', 'int8_weight', 'int4_weight', 'pruned' or 'distilled' (got 'int3') (from --set)"),
    ("compress.int4_weight.block_size=48",
     "pipelines.support-triage.compress.int4_weight: block_size must be a power of two, got 48 (from --set)"),
    ("features.top_k=0", "pipelines.support-triage.features.top_k: must be > 0 (got 0) (from --set)"),
    pytest.param("finetune.method.kind=qlora",
                 "pipelines.support-triage.finetune.method: qlora quantizes the base model to 4 bits with bitsandbytes "
                 "and needs a CUDA GPU; this machine has no CUDA GPU (use kind: lora) (from --set)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")),
    ("finetune.method.kind=adapters",
     "pipelines.support-triage.finetune.method: 'kind' must be one of 'lora', 'dora', 'qlora', 'ia3', "
     "'prompt_tuning' (got 'adapters')"),
    ("validate.checks.txt.severity=warn",
     "pipelines.support-triage.validate.checks.txt: unknown key; did you mean 'text'? (from --set)"),
    ("validate.checks.text.max_tokens=2",
     "pipelines.support-triage.validate.checks.text.max_tokens: must be >= min_tokens (5) (got 2) (from --set)"),
    ("stages=[ingest,warp]", "pipelines.support-triage.stages: unknown stage 'warp'; known stages: "),
    ("retries.prepare=-1", "pipelines.support-triage.retries.prepare: must be >= 0 (got -1) (from --set)"),
    ("ingest.source.n_tickets=abc",
     "pipelines.support-triage.ingest.source.n_tickets: input should be a valid integer, unable to parse "
     "string as an integer (got 'abc') (from --set)"),
    ("serve.upstream.url=vllm:8000/v1", "pipelines.support-triage.serve.upstream.url: must be an http:// or "
     "https:// URL with a host, e.g. http://vllm:8000/v1 (got 'vllm:8000/v1') (from --set)"),
    ("serve.upstream.api_key_env=sk-0123456789abcdef", "pipelines.support-triage.serve.upstream.api_key_env: must be "
     "the name of an environment variable (letters, digits, _), never the key itself (from --set)"),
    ("services.storage.bucket=x",
     "services.storage.bucket: unknown key; allowed: artifacts_dir, s3_endpoint_url, state_dir (from --set)"),
])
def test_bad_values_give_exact_messages(override, expected):
    with pytest.raises(SpecError) as err:
        load_spec(SPEC, [override], env={})
    message = str(err.value)
    assert message.startswith(str(SPEC)), message
    assert expected in message


def test_all_problems_are_reported_at_once():
    with pytest.raises(SpecError) as err:
        load_spec(SPEC, ["prepare.split.test=0", "ingest.source.seed=x"], env={})
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert any("prepare.split.test: must be > 0 (got 0)" in line for line in lines)
    assert any("ingest.source.seed: input should be a valid integer" in line for line in lines)


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\npipelines:\n  x: {stages: [ingest\n")
    with pytest.raises(SpecError, match=r"p.yaml:4: invalid YAML"):
        load_spec(bad)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_unknown_pipeline():
    with pytest.raises(SpecError, match="no pipeline named 'nightly'; pipelines: support-triage"):
        load_spec(SPEC, pipeline="nightly", env={})


def test_interpolation():
    env = {"A": "1", "EMPTY": ""}
    doc = {"x": "${A}", "y": "${B:-two}", "z": "p-${A}-${B:-q}", "n": "${EMPTY:-}", "lit": "$${A}",
           "deep": [{"k": "${A:-9}"}]}
    assert interpolate(doc, env=env) == {"x": "1", "y": "two", "z": "p-1-q", "n": None, "lit": "${A}",
                                         "deep": [{"k": "1"}]}
    with pytest.raises(SpecError, match=r"deep\[0\].k: environment variable NOPE is not set"):
        interpolate({"deep": [{"k": "${NOPE}"}]}, env=env)


def test_environment_reaches_the_spec():
    spec = load_spec(SPEC, env={"LLMOPS_STATE_DIR": "/srv/state", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})
    assert spec.services.storage.state_dir == "/srv/state"
    assert spec.services.storage.s3_endpoint_url == "http://127.0.0.1:9000"


def test_overrides_relative_and_absolute():
    spec = load_spec(SPEC, ["prepare.split.train=0.7", "prepare.split.validation=0.2",
                            "services.storage.artifacts_dir=/tmp/a", "ingest.source={kind: files, uri: s3://b/p}"],
                     env={})
    pipe = spec.pipelines["support-triage"]
    assert pipe.prepare.split.train == 0.7 and pipe.prepare.split.validation == 0.2
    assert spec.services.storage.artifacts_dir == "/tmp/a"
    assert pipe.ingest.source.kind == "files" and pipe.ingest.source.uri == "s3://b/p"


@pytest.mark.parametrize("bad", ["noequals", "=3", "prepare.split=[1"])
def test_malformed_overrides(bad):
    with pytest.raises(SpecError, match=re.escape(f"--set {bad!r}")):
        load_spec(SPEC, [bad], env={})


def test_schema_has_the_discriminated_source():
    schema = specmod.json_schema()
    dumped = json.dumps(schema)
    assert '"discriminator"' in dumped and '"generate"' in dumped and '"files"' in dumped
    assert schema["additionalProperties"] is False


def test_show_round_trips_through_the_loader(tmp_path):
    spec = load_spec(SPEC, ["ingest.source.seed=99"], env={})
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(specmod.dump(spec))
    again = load_spec(resolved, env={})
    assert again == spec
    assert yaml.safe_load(resolved.read_text())["pipelines"]["support-triage"]["ingest"]["source"]["seed"] == 99


# ---- the CLI, as a user runs it

def test_cli_validate_ok():
    proc = run_cli(["config", "validate"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "pipelines.yaml: OK  pipeline support-triage (default): ingest -> validate -> features -> prepare -> finetune" in proc.stdout


def test_cli_bad_spec_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "pipelines.yaml"
    bad.write_text(SPEC.read_text().replace("n_tickets: 2000", "n_tickets: -5"))
    proc = run_cli(["config", "validate", "--file", str(bad)], cwd=tmp_path)
    assert proc.returncode == 2
    assert "pipelines.support-triage.ingest.source.n_tickets: must be > 0 (got -5)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_show_applies_overrides():
    proc = run_cli(["config", "show", "--set", "prepare.split_salt=abc"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["pipelines"]["support-triage"]["prepare"]["split_salt"] == "abc"


def test_cli_schema_is_json():
    proc = run_cli(["config", "schema"], cwd=REPO)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["title"] == "Spec"


@pytest.mark.parametrize("cmd", [[], ["run"], ["stage"], ["config"], ["models"], ["data", "generate"], ["data", "from-traffic"], ["dvc"]])
def test_every_command_has_help(cmd):
    proc = run_cli([*cmd, "--help"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and len(proc.stdout) > 200
