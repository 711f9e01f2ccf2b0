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


