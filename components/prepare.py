"""prepare: deterministic train/validation/test splits of chat-formatted examples.

Each ticket gets its customer's features *as of the ticket's time* from Feast
(``get_historical_features``: a later plan change must not leak into training) and, when
the prompt shows articles, the top-k help-center articles for its text from the vector
store; both are rendered with the task's template into a chat (system, user, assistant:
the gold answer as JSON). The ticket goes to a split by a hash of its id, so it keeps its
split when data is added or reordered. Each split file is written with its SHA-256, and
the answer's JSON Schema with the table-bound values (e.g. article ids) filled in from the
data, for the stages and the endpoint that parse answers. Tickets of a held-out slice
(``test_only``, e.g. the demo's unseen phrasing) go to the test split only, and the
``slice_by`` fields (``phrasing`` among them) travel with each example, so evaluate reports
exact match on them apart from the rest.
"""
from __future__ import annotations

import json

import pandas as pd
from pydantic import Field

from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table, plain
from components.featurestore import Embedder, FeaturesSpec, Retriever, historical_features, open_online, open_store
from components.reports import PrepareReport, SplitInfo
from components.splits import SPLITS, SplitFractions, assign
from components.task import AnswerSchema, TaskSpec, answer_json, build_messages, labels_of, query_text, \
    resolve_values

OUTPUTS = tuple(f"{s}.jsonl" for s in SPLITS) + (AnswerSchema.FILE,)
TIME_COLUMN = "created_at"


class PrepareSpec(StrictModel):
    split: SplitFractions = SplitFractions()
    split_salt: str = Field("tessera-v1", min_length=1)  # change to draw another deterministic split
    slice_by: list[str] = ["channel", "plan", "phrasing"]  # fields kept with each example for per-slice metrics
    # column -> values whose tickets go to the test split only (held out from training)
    test_only: dict[str, list[str]] = {"phrasing": ["unseen"]}


def run(cfg: PrepareSpec, io: StageIO) -> StageResult:
    """Write train/validation/test JSONL files and the answer schema. Raises StageError when
    tickets lack gold labels (they cannot be trained on) or a split is empty."""
    task: TaskSpec = io.sections["task"]
    features_cfg: FeaturesSpec = io.sections.get("features", FeaturesSpec())
    src = io.inputs["validate"]
    tickets = pd.read_parquet(src / "tickets.parquet")
    missing = [f for f in task.answer if f not in tickets.columns]
    if missing:
        raise StageError(f"{src / 'tickets.parquet'}: no column for answer field(s) {', '.join(missing)} "
                         f"(task.answer); columns: {', '.join(tickets.columns)}")
    unlabelled = tickets[tickets[list(task.answer)].isna().any(axis=1)]
    if len(unlabelled):
        raise StageError(f"{src / 'tickets.parquet'}: {len(unlabelled)} ticket(s) lack a gold label "
                         f"({', '.join(task.answer)}), e.g. {', '.join(unlabelled.ticket_id.astype(str).head(3))}")
    tables = {name: pd.read_parquet(src / f"{name}.parquet") for name in task.tables()}
    schema = AnswerSchema.of(task, resolve_values(task, tables))

    store = open_store(io.feature_repo, io.state_dir, io.pipeline)
    features = historical_features(store, features_cfg, tickets, TIME_COLUMN)
    joined = pd.concat([tickets.reset_index(drop=True), features], axis=1)
    rows = joined.to_dict("records")
    if task.uses_retrieval():
        embedder = Embedder(features_cfg.embedding_model, io.models, io.state_dir, features_cfg.batch_size)
        online = open_online(io.feature_repo, io.state_dir, io.pipeline, store)
        try:
            retrieved = Retriever(online, embedder, features_cfg.top_k).search([query_text(r, task) for r in rows],
                                                                               progress=True)
        finally:
            online.close()  # another process (a feature server) may open the store now
    else:
        retrieved = [[] for _ in rows]

    buckets: dict[str, list[str]] = {s: [] for s in SPLITS}
    hits: dict[str, list[bool]] = {s: [] for s in SPLITS}
    gold_article = "article_id" if "article_id" in task.answer else None
    for row, articles in zip(rows, retrieved):
        row[TIME_COLUMN] = pd.Timestamp(row[TIME_COLUMN]).isoformat()
        split = assign(row, cfg.split, cfg.split_salt, cfg.test_only)
        labels = labels_of(row, task)
        example = {
            "ticket_id": row["ticket_id"],
            "messages": build_messages(row, task, articles) + [{"role": "assistant",
                                                                "content": answer_json(labels, task)}],
            "labels": labels,
            "retrieved": [a["article_id"] for a in articles],
            "meta": {k: plain(row.get(k)) for k in cfg.slice_by},
        }
        buckets[split].append(json.dumps(example, ensure_ascii=False, sort_keys=True, default=str))
        if gold_article:
            hits[split].append(row[gold_article] in example["retrieved"])
    outputs, splits = {}, {}
    for split in SPLITS:
        if not buckets[split] and split != "validation":
            raise StageError(f"prepare: split {split!r} is empty ({len(joined)} tickets); "
                             "use more data or larger fractions")
        path = io.out_dir / f"{split}.jsonl"
        path.write_text("".join(line + "\n" for line in buckets[split]), encoding="utf-8")
        outputs[split] = path
        splits[split] = SplitInfo(examples=len(buckets[split]), sha256=file_sha256(path))
    outputs["answer_schema"] = schema.write(io.out_dir / AnswerSchema.FILE)

    recall = {}
    if task.uses_retrieval() and gold_article:
        every = [h for s in SPLITS for h in hits[s]]
        recall = {"all": round(sum(every) / len(every), 4)} | {
            s: round(sum(hits[s]) / len(hits[s]), 4) for s in SPLITS if hits[s]}
    no_features = int(features.isna().all(axis=1).sum())
    report = PrepareReport(splits=splits, n_without_features=no_features,
                           retrieval_top_k=features_cfg.top_k if task.uses_retrieval() else None,
                           retrieval_recall=recall)
    k = features_cfg.top_k
    table = [{"split": s, "examples": m.examples, "sha256": m.sha256[:12],
              **({f"recall@{k}": f"{recall[s]:.3f}"} if s in recall else {})} for s, m in splits.items()]
    summary = (f"### prepare\n{len(joined)} tickets -> chat examples with the features as of the ticket's time "
               f"(Feast; {no_features} without any)"
               + (f" and the top {k} retrieved articles (recall@{k} {recall['all']:.3f})" if recall else "")
               + ".\n\n" + markdown_table(table))
    return StageResult(outputs=outputs, report=report, summary=summary)

