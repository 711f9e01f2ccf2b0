"""`llmops data ...`, `llmops features ...`, `llmops dvc ...`: demo data, the Feast store, dvc.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from components.base import StageError
from llmops.cli_common import (DEFAULT_SPEC, PipelineOpt, SpecFile, _fail, _load, _root, console, data_app, dvc_app,
                               features_app, out)


# ---------------------------------------------------------------- data

@data_app.command("generate")
def data_generate(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the tables into.")] = Path("data/demo"),
    n: Annotated[int, typer.Option("--n", help="Number of tickets.", min=1)] = 2000,
    customers: Annotated[int, typer.Option("--customers", help="Number of customers.", min=1)] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same data.")] = 7,
    shift: Annotated[Optional[str], typer.Option(
        "--shift", help="Shifted traffic for drift tests: new_product, language, long or spam.")] = None,
    shift_fraction: Annotated[float, typer.Option(
        "--shift-fraction", help="Share of tickets that are shifted (with --shift).", min=0.0, max=1.0)] = 1.0,
) -> None:
    """Generate demo tickets (with gold labels), customers, profile history and articles as Parquet."""
    from components import generate

    if shift is not None and shift not in generate.SHIFTS:
        _fail(f"--shift {shift!r}: expected one of {', '.join(generate.SHIFTS)}")
    with console.status(f"generating {n} tickets..."):
        data = generate.generate(n_tickets=n, n_customers=customers, seed=seed, shift=shift,
                                 shift_fraction=shift_fraction)
        paths = data.write(out_dir)
    for name, path in paths.items():
        out.print(f"{name:<18} {len(getattr(data, name)):>6} rows  {path}")


# ---------------------------------------------------------------- features

def _feast(file: Path, pipeline: str | None):
    from llmops.runner import configure_environment, stage_dir

    spec = _load(file, None, pipeline)
    name, pipe = spec.pipeline(pipeline)
    configure_environment(spec, _root(file))
    return spec, name, pipe, (_root(file) / spec.services.feast.repo).resolve(), stage_dir(spec, _root(file), name, "features")


@features_app.command("apply")
def features_apply(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """`feast apply`: register the entities, feature views and feature service of feature_repo/."""
    from components import featurestore

    spec, name, _, repo, _ = _feast(file, pipeline)
    try:
        store = featurestore.open_store(repo, spec.state_dir(_root(file)), name, require_registry=False)
        featurestore.apply(store, repo)
    except StageError as exc:
        _fail(str(exc), code=1)
    out.print(f"applied {repo} -> registry {featurestore.feast_state(spec.state_dir(_root(file)), name) / 'registry.db'}")


@features_app.command("embed")
def features_embed(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """Embed the validated articles (skipping those whose text is unchanged) and publish them."""
    import pandas as pd

    from components import features, featurestore
    from llmops.runner import stage_dir

    spec, name, pipe, repo, out_dir = _feast(file, pipeline)
    articles_file = stage_dir(spec, _root(file), name, "validate") / "articles.parquet"
    if not articles_file.exists():
        _fail(f"{articles_file} is missing; run `llmops run --until validate` first", code=1)
    state = featurestore.feast_state(spec.state_dir(_root(file)), name)
    tickets = pd.read_parquet(articles_file.with_name("tickets.parquet"), columns=["created_at"])
    target = out_dir / "article_embeddings.parquet"
    with console.status("embedding articles..."):
        embedder = featurestore.Embedder(pipe.features.embedding_model, dict(spec.models), spec.state_dir(_root(file)),
                                     pipe.features.batch_size)
        _, embedded, reused = features.embed_and_publish(pd.read_parquet(articles_file), tickets.created_at,
                                                         embedder, state, target)
    out.print(f"{embedded} article(s) embedded, {reused} unchanged -> {target}")


@features_app.command("materialize")
def features_materialize(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """Load new feature values into the online store (incremental: since the last run)."""
    from datetime import datetime, timezone

    from components import featurestore

    spec, name, _, repo, _ = _feast(file, pipeline)
    try:
        store = featurestore.open_store(repo, spec.state_dir(_root(file)), name)
        featurestore.materialize(store, None, datetime.now(timezone.utc))
    except StageError as exc:
        _fail(str(exc), code=1)
    out.print("materialized up to now")


# ---------------------------------------------------------------- dvc

@dvc_app.command("generate")
def dvc_generate(file: SpecFile = Path(DEFAULT_SPEC),
                 output: Annotated[Path, typer.Option("--output", "-o")] = Path("dvc.yaml")) -> None:
    """Write dvc.yaml for the default pipeline from the spec and the stage registry."""
    from llmops import dvcfile

    spec = _load(file, None, None)
    output.write_text(dvcfile.render(dvcfile.build(spec, file.name)))
    out.print(f"wrote {output}")


@dvc_app.command("check")
def dvc_check(file: SpecFile = Path(DEFAULT_SPEC),
              dvc_file: Annotated[Path, typer.Option("--dvc-file")] = Path("dvc.yaml")) -> None:
    """Fail (exit 1) when dvc.yaml and pipelines.yaml disagree, listing each difference."""
    from llmops import dvcfile

    spec = _load(file, None, None)
    problems = dvcfile.check(spec, dvc_file, file.name)
    for problem in problems:
        console.print(f"[red]{escape(problem)}[/]", highlight=False)
    if problems:
        _fail("dvc.yaml is out of date; run `llmops dvc generate`", code=1)
    out.print(f"{dvc_file} agrees with {file}")
