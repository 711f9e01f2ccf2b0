"""finetune on a tiny model built here (2 layers, SmolLM2's tokenizer): loss masking,
every PEFT method trains and round-trips through safetensors, resume after an
interruption gives the same adapter, qlora is refused without a GPU."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from components.finetune import (IGNORE, DoraMethod, FinetuneSpec, IA3Method, LoraMethod, PromptTuningMethod, batches,
                                 encode, train)
from tests.conftest import provisioned_models


@pytest.fixture(scope="module")
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


def _examples(n: int, offset: int = 0) -> list[dict]:
    intents = ["billing_refund", "login_problem", "bug_report", "performance"]
    out = []
    for i in range(offset, offset + n):
        intent = intents[i % 4]
        out.append({"ticket_id": f"T{i}", "messages": [
            {"role": "system", "content": "Triage. Reply with JSON."},
            {"role": "user", "content": f"Ticket {i}: something about {intent.replace('_', ' ')} " + "x " * (i % 7)},
            {"role": "assistant", "content": json.dumps({"intent": intent, "priority": "low", "article_id": "KB-101"})},
        ]})
    return out


def _cfg(**kw) -> FinetuneSpec:
    base = dict(max_steps=6, batch_size=4, learning_rate=5e-3, warmup_steps=1, eval_every=3, eval_examples=8,
                checkpoint_every=2, seed=3)
    return FinetuneSpec(**{**base, **kw})


def test_loss_counts_only_the_answer(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    example = _examples(1)[0]
    ids, labels = encode(example, tokenizer)
    assert len(ids) == len(labels)
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert all(label == IGNORE for label in labels[:first])
    prompt_text = tokenizer.decode(ids[:first])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "Ticket 0" in prompt_text
    answer_text = tokenizer.decode([t for t in labels if t != IGNORE])
    assert answer_text.startswith(example["messages"][2]["content"])
    assert answer_text.rstrip("\n").endswith("<|im_end|>")  # the model learns to stop


def test_batches_group_lengths_and_are_seeded():
    lengths = [(i * 37) % 101 for i in range(200)]
    a, b = batches(lengths, 8, seed=1, epoch=0), batches(lengths, 8, seed=1, epoch=0)
    assert a == b and a != batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for batch in a for i in batch) == list(range(200))
    # padding waste: spread of lengths within a batch is far below the global spread
    spread = sum(max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in a) / len(a)
    assert spread < 25


@pytest.mark.parametrize("method", [LoraMethod(r=4, alpha=8), DoraMethod(r=4, alpha=8), IA3Method(),
                                    PromptTuningMethod(num_virtual_tokens=4)], ids=lambda m: m.kind)
def test_each_method_trains_and_round_trips(tiny, tmp_path, method):
    from peft import PeftModel

    cfg = _cfg(method=method, max_steps=4)
    metrics = train(cfg, str(tiny), _examples(24), _examples(8, 100), tmp_path, tmp_path / "ckpt", progress=False)
    assert metrics["steps"] == 4 and metrics["trainable_params"] > 0
    assert metrics["trainable_share"] < 0.5
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == {
        "lora": "LORA", "dora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING"}[method.kind]
    assert not list(adapter.glob("*.bin"))
    # load it back on a fresh base and check it changes the outputs
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny, use_safetensors=True)
    x = tokenizer.apply_chat_template(_examples(1)[0]["messages"], return_tensors="pt")
    with torch.no_grad():
        before = base(x).logits[0, -1].clone()
        tuned = PeftModel.from_pretrained(base, adapter)
        after = tuned(x).logits[0, -1]
    assert not torch.allclose(before, after)
    assert not (tmp_path / "ckpt").exists()  # finished runs leave no checkpoint behind


def test_training_lowers_the_validation_loss(tiny, tmp_path):
    metrics = train(_cfg(max_steps=12, eval_every=4), str(tiny), _examples(64), _examples(8, 100), tmp_path,
                    tmp_path / "ckpt", progress=False)
    log = (tmp_path / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,learning_rate,tokens_per_s,val_loss" and len(log) == 13
    val = [float(r.split(",")[-1]) for r in log[1:] if r.split(",")[-1]]
    assert len(val) == 3 and val[-1] < val[0]
    assert metrics["best_val_loss"] == pytest.approx(min(val), abs=1e-4)


def test_resume_after_interruption_gives_the_same_adapter(tiny, tmp_path):
    cfg = _cfg(max_steps=6, checkpoint_every=2)
    data, val = _examples(40), _examples(8, 100)
    train(cfg, str(tiny), data, val, tmp_path / "straight", tmp_path / "ckpt-a", progress=False)

    def kill_at_5(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt  # as if the worker died after step 5 (last checkpoint: step 4)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(tiny), data, val, tmp_path / "first", tmp_path / "ckpt-b", on_step=kill_at_5, progress=False)
    assert json.loads((tmp_path / "ckpt-b" / "state.json").read_text())["step"] == 4
    metrics = train(cfg, str(tiny), data, val, tmp_path / "second", tmp_path / "ckpt-b", progress=False)
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 6
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "second" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    log = (tmp_path / "second" / "train_log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == [1, 2, 3, 4, 5, 6]


def test_early_stopping(tiny, tmp_path):
    # a learning rate this high makes the validation loss worse at every measurement
    metrics = train(_cfg(max_steps=40, eval_every=1, early_stopping_patience=2, learning_rate=5.0,
                         warmup_steps=0), str(tiny), _examples(40), _examples(8, 100), tmp_path, tmp_path / "c",
                    progress=False)
    assert metrics["stopped_by"] == "early_stopping" and metrics["steps"] < 40


def test_qlora_is_refused_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines without one")
    with pytest.raises(ValidationError, match="qlora .* needs a CUDA GPU; this machine has no CUDA GPU"):
        FinetuneSpec.model_validate({"method": {"kind": "qlora"}})
