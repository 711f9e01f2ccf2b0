"""finetune and the shared training loop on a tiny model built here (2 layers, SmolLM2's
tokenizer): loss masking, every PEFT method trains and round-trips through safetensors,
resume after an interruption gives the same adapter, the schedule is transformers', the
step budget decides and the clock only stops loudly, qlora is refused without a GPU."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.base import StageError
from components.finetune import DoraMethod, FinetuneSpec, IA3Method, LoraMethod, PromptTuningMethod
from components.finetune import fit as train
from components.lm import IGNORE, answer_loss, collate, encode, pick_device
from components.training import batches
from tests.components.conftest import assert_fast_tokenizer, chat_examples


def _cfg(**kw) -> FinetuneSpec:
    base = dict(max_steps=6, batch_size=4, learning_rate=5e-3, warmup_steps=1, eval_every=3, eval_examples=8,
                checkpoint_every=2, seed=3)
    return FinetuneSpec(**{**base, **kw})


def test_loss_counts_only_the_answer(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    example = chat_examples(1)[0]
    ids, labels = encode(example["messages"], tokenizer)
    assert len(ids) == len(labels)
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert all(label == IGNORE for label in labels[:first])
    prompt_text = tokenizer.decode(ids[:first])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "Ticket 0" in prompt_text
    answer_text = tokenizer.decode([t for t in labels if t != IGNORE])
    assert answer_text.startswith(example["messages"][2]["content"])
    assert answer_text.rstrip("\n").endswith("<|im_end|>")  # the model learns to stop


def test_answer_only_head_gives_the_full_loss(tiny):
    """The output head applied from the first answer position on gives the same loss as the
    model's own (all positions), on a right-padded batch of different lengths."""
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    ids, labels, mask = collate([encode(e["messages"], tokenizer) for e in chat_examples(5)], tokenizer)
    assert len(set(mask.sum(1).tolist())) > 1  # really padded
    assert (mask[:, 0] == 1).all()  # on the right
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        fast = answer_loss(model, ids, mask, labels).item()
    assert fast == pytest.approx(full, rel=1e-5)


def test_precision_on_this_machine():
    device, weights, autocast = pick_device("fp32")
    assert (weights, autocast) == (torch.float32, None)
    if not torch.cuda.is_available():
        # bf16 on a CPU: fp32 weights (the adapter and optimizer stay exact), bf16 autocast
        assert pick_device("bf16") == (torch.device("cpu"), torch.float32, torch.bfloat16)


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
    metrics = train(cfg, str(tiny), chat_examples(24), chat_examples(8, 100), tmp_path, tmp_path / "ckpt", progress=False)
    assert metrics["steps"] == 4 and metrics["trainable_params"] > 0
    assert metrics["trainable_share"] < 0.5
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == {
        "lora": "LORA", "dora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING"}[method.kind]
    assert not list(adapter.glob("*.bin"))
    assert_fast_tokenizer(adapter)  # the base model's tokenizer files, as its conversion wrote them
    # load it back on a fresh base and check it changes the outputs
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny, use_safetensors=True)
    x = tokenizer.apply_chat_template(chat_examples(1)[0]["messages"], return_tensors="pt")
    with torch.no_grad():
        before = base(x).logits[0, -1].clone()
        tuned = PeftModel.from_pretrained(base, adapter)
        after = tuned(x).logits[0, -1]
    assert not torch.allclose(before, after)
    assert not (tmp_path / "ckpt").exists()  # finished runs leave no checkpoint behind


def test_training_lowers_the_validation_loss(tiny, tmp_path):
    metrics = train(_cfg(max_steps=12, eval_every=4), str(tiny), chat_examples(64), chat_examples(8, 100), tmp_path,
                    tmp_path / "ckpt", progress=False)
    log = (tmp_path / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,learning_rate,tokens_per_s,val_loss" and len(log) == 13
    val = [float(r.split(",")[-1]) for r in log[1:] if r.split(",")[-1]]
    assert len(val) == 3 and val[-1] < val[0]
    assert metrics["best_val_loss"] == pytest.approx(min(val), abs=1e-4)


def test_resume_after_interruption_gives_the_same_adapter(tiny, tmp_path):
    cfg = _cfg(max_steps=6, checkpoint_every=2)
    data, val = chat_examples(40), chat_examples(8, 100)
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
                         warmup_steps=0), str(tiny), chat_examples(40), chat_examples(8, 100), tmp_path, tmp_path / "c",
                    progress=False)
    assert metrics["stopped_by"] == "early_stopping" and metrics["steps"] < 40


def test_qlora_is_refused_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines without one")
    with pytest.raises(ValidationError, match="qlora .* needs a CUDA GPU; this machine has no CUDA GPU"):
        FinetuneSpec.model_validate({"method": {"kind": "qlora"}})


def test_schedule_is_cosine_with_warmup_and_a_floor(tiny, tmp_path):
    train(_cfg(max_steps=10, warmup_steps=2, learning_rate=1e-2, min_lr_ratio=0.1, eval_every=10), str(tiny),
          chat_examples(40), chat_examples(4, 100), tmp_path, tmp_path / "ckpt", progress=False)
    rates = [float(r.split(",")[2]) for r in (tmp_path / "train_log.csv").read_text().splitlines()[1:]]
    # the rate after each step: warmup to the peak at step 2, cosine down to 10% of it at step 10
    assert rates[1] == pytest.approx(1e-2)
    assert rates[-1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))


def test_max_minutes_is_a_loud_safety_stop_that_resumes(tiny, tmp_path):
    cfg = _cfg(max_steps=6, max_minutes=1e-5, checkpoint_every=100)
    with pytest.raises(StageError, match=r"max_minutes \(1e-05\) ran out at step 1 of 6.*resume"):
        train(cfg, str(tiny), chat_examples(40), chat_examples(8, 100), tmp_path / "a", tmp_path / "ckpt",
              progress=False)
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 1
    done = train(cfg.model_copy(update={"max_minutes": None}), str(tiny), chat_examples(40), chat_examples(8, 100),
                 tmp_path / "b", tmp_path / "ckpt", progress=False)
    assert done["resumed_from_step"] == 1 and done["steps"] == 6
