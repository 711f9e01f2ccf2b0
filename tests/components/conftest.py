"""Fixtures of the component tests: a tiny model with SmolLM2's tokenizer, built here, and
chats in the shape prepare writes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import provisioned_models


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    smollm2 = provisioned_models() / "smollm2-135m-instruct"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smollm2 / name).exists():
            shutil.copy(smollm2 / name, folder / name)
    return folder


def chat_examples(n: int, offset: int = 0) -> list[dict]:
    """``n`` chats like prepare's: messages, gold labels, meta (channel, plan) for slices."""
    intents = ["billing_refund", "login_problem", "bug_report", "performance"]
    out = []
    for i in range(offset, offset + n):
        intent = intents[i % 4]
        labels = {"intent": intent, "priority": "low", "article_id": "KB-101"}
        out.append({"ticket_id": f"T{i}", "labels": labels,
                    "meta": {"channel": ("email", "chat")[i % 2], "plan": ("free", "pro", "enterprise")[i % 3]},
                    "messages": [
                        {"role": "system", "content": "Triage. Reply with JSON."},
                        {"role": "user", "content": f"Ticket {i}: something about {intent.replace('_', ' ')} "
                                                    + "x " * (i % 7)},
                        {"role": "assistant", "content": json.dumps(labels)}]})
    return out




def triage_examples(n: int, offset: int = 0) -> list[dict]:
    """``n`` chats rendered by the task's own prompt builder (default task), so the
    behavioural probes can parse and change their fields."""
    from components.task import TaskSpec, answer_json, build_messages

    plans = ("free", "starter", "pro", "enterprise")
    bodies = ("Hi team,\n\nWe were billed twice for the Boards widgets. Please refund it.\n\nThanks,\nAna Smith",
              "hey - I can't sign in to the sync app since this morning.",
              "Call summary: customer reports: the iOS app crashes on start.")
    intents = ("billing_refund", "login_problem", "bug_report")
    out = []
    for i in range(offset, offset + n):
        row = {"ticket_id": f"T{i}", "customer_id": f"C{i}", "created_at": "2026-05-01T00:00:00+00:00",
               "channel": ("email", "chat", "phone")[i % 3], "subject": f"Ticket number {i}", "body": bodies[i % 3],
               "plan": plans[i % 4], "tenure_days": 100, "open_tickets_30d": 1, "seats": 3, "new_customer": "no",
               "busy_account": "no", "account_weight": {"free": "-1", "enterprise": "+1"}.get(plans[i % 4], "+0"),
               "intent": intents[i % 3], "priority": "medium", "article_id": "KB-101"}
        articles = [{"article_id": "KB-101", "title": "Refunds and duplicate charges in Tessera Sync"}]
        out.append({"ticket_id": row["ticket_id"], "labels": {k: row[k] for k in ("intent", "priority", "article_id")},
                    "meta": {"channel": row["channel"], "plan": row["plan"]},
                    "messages": build_messages(row, TaskSpec(), articles)
                    + [{"role": "assistant", "content": answer_json(row, TaskSpec())}]})
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny, tmp_path_factory) -> dict:
    """prepare/, finetune/ and evaluate/ folders as the stages leave them: the tiny model
    fine-tuned for 3 steps on prompt-template chats and evaluated on 6 test chats."""
    from components.base import StageIO
    from components.evaluate import EvaluateSpec
    from components.evaluate import run as evaluate
    from components.finetune import FinetuneSpec, fit
    from components.reports import TrainingReport

    root = tmp_path_factory.mktemp("tiny-run")
    splits = write_prepared(root / "prepare", {"train": triage_examples(12, 100),
                                               "validation": triage_examples(4, 200), "test": triage_examples(6)})
    ft_cfg = FinetuneSpec(base_model=str(tiny), max_steps=3, batch_size=4, warmup_steps=1, eval_every=3,
                          eval_examples=4, seed=1)
    TrainingReport(**fit(ft_cfg, str(tiny), triage_examples(12, 100), triage_examples(4, 200), root / "finetune",
                         root / "ckpt", progress=False)).write(root / "finetune")
    (root / "evaluate").mkdir()
    eval_cfg = EvaluateSpec(batch_size=3, max_new_tokens=8, latency_requests=1)
    result = evaluate(eval_cfg, StageIO(pipeline="t", out_dir=root / "evaluate", state_dir=root / "state",
                                        inputs={"prepare": root / "prepare", "finetune": root / "finetune"},
                                        sections={"finetune": ft_cfg}))
    result.report.write(root / "evaluate")
    return {"root": root, "finetune": ft_cfg, "evaluate": eval_cfg, "splits": splits, "tiny": tiny}


ARTICLE_IDS = ["KB-101", "KB-102", "KB-201"]


def write_prepared(folder: Path, splits: dict[str, list[dict]], task=None) -> dict:
    """A prepare/ folder as the stage leaves it: split files, the answer schema (article ids
    as in the fixtures' chats) and its report."""
    from components.base import file_sha256
    from components.reports import PrepareReport, SplitInfo
    from components.task import AnswerSchema, TaskSpec

    folder.mkdir(parents=True, exist_ok=True)
    info = {}
    for split, examples in splits.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in examples))
        info[split] = SplitInfo(examples=len(examples), sha256=file_sha256(path))
    task = task or TaskSpec()
    values = {f: ARTICLE_IDS for f, a in task.answer.items() if a.values_from}
    AnswerSchema.of(task, values).write(folder / AnswerSchema.FILE)
    PrepareReport(splits=info, n_without_features=0).write(folder)
    return {s: i.model_dump() for s, i in info.items()}
