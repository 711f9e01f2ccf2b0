"""`llmops data ...`, `llmops features ...`, `llmops dvc ...`: demo data, the Feast store, dvc.yaml."""
from __future__ import annotations

import time
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
    unseen_share: Annotated[float, typer.Option(
        "--unseen-share", help="Share of tickets worded in a phrasing no other ticket uses (column phrasing; "
                               "the pipeline's demo data: ingest.source.unseen_share).", min=0.0, max=1.0)] = 0.0,
) -> None:
    """Generate demo tickets (with gold labels), customers, profile history and articles as Parquet."""
    from components import generate

    if shift is not None and shift not in generate.SHIFTS:
        _fail(f"--shift {shift!r}: expected one of {', '.join(generate.SHIFTS)}")
    with console.status(f"generating {n} tickets..."):
        data = generate.generate(n_tickets=n, n_customers=customers, seed=seed, shift=shift,
                                 shift_fraction=shift_fraction, unseen_share=unseen_share)
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
    state = spec.state_dir(_root(file))
    try:
        online = featurestore.open_online(repo, state, name, featurestore.open_store(repo, state, name, False))
        online.apply(repo)
        online.close()
    except StageError as exc:
        _fail(str(exc), code=1)
    out.print(f"applied {repo} -> registry {featurestore.feast_state(state, name) / 'registry.db'} ({online.where})")


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
    from components import featurestore

    spec, name, _, repo, _ = _feast(file, pipeline)
    started = time.perf_counter()
    try:
        with console.status("materializing ..."):
            where = featurestore.materialize_until_now(repo, spec.state_dir(_root(file)), name)
    except StageError as exc:
        _fail(str(exc), code=1)
    out.print(f"materialized up to now ({where}) in {time.perf_counter() - started:.1f} s")


@features_app.command("serve")
def features_serve(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None,
                   port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).")] = 0) -> None:
    """Start the feature server in the background: the one process that opens the online
    store, so the endpoint, pipeline runs and monitoring can use it at the same time."""
    from components import featureserver

    spec, name, _, repo, _ = _feast(file, pipeline)
    try:
        with console.status("starting the feature server (Feast) ..."):
            record, started = featureserver.start(repo, spec.state_dir(_root(file)), name, port=port)
    except StageError as exc:
        _fail(str(exc), code=1)
    verb = "started" if started else "already running"
    out.print(f"feature server {verb}: {record['url']} (pid {record['pid']}, since {record['started']}); "
              f"log {record['log']}; stop it with `llmops features stop`")


@features_app.command("status")
def features_status(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """Whether a feature server owns the online store, where, and since when (exit 1: none)."""
    from components import featureserver

    spec, name, _, _, _ = _feast(file, pipeline)
    online = featureserver.remote(spec.state_dir(_root(file)), name)
    if online is None:
        out.print("no feature server: each process opens the online store itself (one at a time)")
        raise typer.Exit(1)
    healthy = online.healthy()
    record = featureserver.running(spec.state_dir(_root(file)), name) or {}
    since = f", pid {record['pid']}, since {record['started']}" if record else ""
    out.print(f"feature server {online.url}{since}: {'healthy' if healthy else 'NOT answering /health'}")
    if not healthy:
        raise typer.Exit(1)


@features_app.command("stop")
def features_stop(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """Stop the feature server started by `llmops features serve` (or by `llmops serve`)."""
    from components import featureserver

    spec, name, _, _, _ = _feast(file, pipeline)
    record = featureserver.stop(spec.state_dir(_root(file)), name)
    out.print(f"stopped the feature server {record['url']} (pid {record['pid']})" if record
              else "no feature server was running")


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
