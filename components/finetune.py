"""finetune: supervised fine-tuning of the base model with a PEFT method, on CPU or GPU.

The examples are the chats written by ``prepare``; the loss counts only the assistant's
answer (prompt tokens are masked with -100). Batches group examples of similar length,
so little compute goes to padding. Every ``checkpoint_every`` steps the adapter, the
optimizer, the scheduler and the random state are saved under the state folder; a run
that is killed and started again with the same config and data resumes from there. The
validation loss is measured every ``eval_every`` steps; the best adapter is kept and
training stops early when it has not improved ``early_stopping_patience`` times.

The same code runs on a GPU worker: the device is picked at run time (bf16 there when
``precision: auto``); ``qlora`` (4-bit base weights) needs a CUDA GPU and bitsandbytes
and is refused at spec validation elsewhere.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import inspect
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

from pydantic import Field, model_validator

from components import tracking
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table
from components.models import ModelError, check_safe_weights, resolve

OUTPUTS = ("adapter", "train_log.csv")
IGNORE = -100  # label of tokens that do not count in the loss


class LoraMethod(StrictModel):
    kind: Literal["lora"] = "lora"
    r: int = Field(16, gt=0)  # rank: higher fits more, costs memory and time
    alpha: int = Field(32, gt=0)  # scale = alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[list[str], Literal["all-linear"]] = "all-linear"
    last_layers: int | None = Field(None, gt=0)  # adapters only in the last N blocks: backward stops there

    def peft_config(self, model):
        from peft import LoraConfig

        n_layers = model.config.num_hidden_layers
        layers = list(range(n_layers - self.last_layers, n_layers)) if self.last_layers else None
        targets = self.target_modules
        if layers and targets == "all-linear":
            targets = linear_module_names(model)  # peft cannot combine "all-linear" with a layer list
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets, layers_to_transform=layers,
                          use_dora=self.kind == "dora", task_type="CAUSAL_LM")


class DoraMethod(LoraMethod):
    kind: Literal["dora"] = "dora"


class QloraMethod(LoraMethod):
    kind: Literal["qlora"] = "qlora"

    @model_validator(mode="after")
    def _needs_cuda(self) -> "QloraMethod":
        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("qlora quantizes the base model to 4 bits with bitsandbytes and needs a CUDA GPU; "
                             "this machine has " + ("no CUDA GPU" if not torch.cuda.is_available()
                                                    else "no bitsandbytes") + " (use kind: lora)")
        return self


class IA3Method(StrictModel):
    kind: Literal["ia3"] = "ia3"
    target_modules: list[str] = ["k_proj", "v_proj", "down_proj"]
    feedforward_modules: list[str] = ["down_proj"]

    def peft_config(self, model):
        from peft import IA3Config

        return IA3Config(target_modules=self.target_modules, feedforward_modules=self.feedforward_modules,
                         task_type="CAUSAL_LM")


class PromptTuningMethod(StrictModel):
    kind: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(16, gt=0)  # learned prompt length; each costs context

    def peft_config(self, model):
        from peft import PromptTuningConfig

        return PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens, task_type="CAUSAL_LM")


def linear_module_names(model) -> list[str]:
    """Names (last part) of the Linear layers inside the transformer blocks: what peft's
    "all-linear" selects (the output head excluded)."""
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


Method = Annotated[Union[LoraMethod, DoraMethod, QloraMethod, IA3Method, PromptTuningMethod],
                   Field(discriminator="kind")]


class FinetuneSpec(StrictModel):
    base_model: str = "smollm2-135m-instruct"
    method: Method = LoraMethod()
    max_steps: int = Field(200, gt=0)
    max_minutes: float | None = Field(None, gt=0)  # stop (and keep the best adapter) after this long
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)  # optimizer step every N batches: effective batch = batch_size x N
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    max_seq_len: int = Field(384, gt=0)  # longer examples are skipped (and counted)
    eval_every: int = Field(25, gt=0)  # steps between validation-loss measurements
    eval_examples: int = Field(64, gt=0)  # validation examples used for that loss
    early_stopping_patience: int = Field(3, gt=0)
    checkpoint_every: int = Field(25, gt=0)
    gradient_checkpointing: bool = False  # less memory, ~30% slower
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU that has it, fp32 otherwise
    seed: int = 7


def base_model_of(io: StageIO) -> str:
    """The local path of the base model a later stage (evaluate, compress) loads: the
    finetune section's ``base_model``, resolved through the catalog."""
    cfg: FinetuneSpec = io.sections.get("finetune", FinetuneSpec())
    try:
        return resolve(cfg.base_model, io.models, io.state_dir)
    except ModelError as exc:
        raise StageError(f"finetune.base_model: {exc}") from exc


# ---------------------------------------------------------------- data

def encode(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that count only the assistant's answer."""
    ids = tokenizer.apply_chat_template(example["messages"])
    prompt = tokenizer.apply_chat_template(example["messages"][:-1], add_generation_prompt=True)
    if ids[:len(prompt)] != prompt:
        raise StageError(f"ticket {example.get('ticket_id')}: the chat template renders the prompt differently "
                         "with and without the answer; cannot mask the prompt")
    return ids, [IGNORE] * len(prompt) + ids[len(prompt):]


def batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, in a seeded order: within each
    shuffled window of 16 batches examples are sorted by length, then batches shuffled."""
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    out = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: lengths[j])
        out += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def collate(items: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (x, y) in enumerate(items):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return ids, labels, mask


# ---------------------------------------------------------------- training

def pick_device(precision: str):
    """(device, dtype of the weights, autocast dtype or None) for a precision setting.

    GPU: bf16 weights when asked or when the GPU has bf16 (``auto``). CPU: fp32 weights with
    bf16 autocast when asked or, for ``auto``, when the CPU has bf16 instructions (AVX512-BF16
    or AMX): about twice the tokens/s of fp32 on this stage, while the adapter's weights and
    the optimizer stay in fp32."""
    import torch

    if torch.cuda.is_available():
        bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
        return torch.device("cuda"), torch.bfloat16 if bf16 else torch.float32, None
    if precision == "bf16" or (precision == "auto" and cpu_has_bf16()):
        return torch.device("cpu"), torch.float32, torch.bfloat16
    return torch.device("cpu"), torch.float32, None


def cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def answer_positions(labels):
    """(positions whose logits predict an answer token, from the batch's first answer on; the
    tokens they predict, IGNORE where not an answer). Position p predicts token p + 1."""
    import torch

    answer = labels != IGNORE
    starts = torch.where(answer.any(1), answer.int().argmax(1), labels.shape[1])
    first = max(int(starts.min()) - 1, 0)
    return torch.arange(first, labels.shape[1] - 1, device=labels.device), labels[:, first + 1:]


def answer_loss(model, ids, mask, labels, logits_to_keep: bool = True):
    """Mean cross-entropy over the answer tokens, as ``model(labels=labels).loss`` computes it,
    but with the output head applied only from the first answer position on: the prompt
    positions' logits (49k per token) are most of the head's time and memory and count for
    nothing in this loss."""
    import torch

    if not logits_to_keep:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    keep, target = answer_positions(labels)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE)


def train(cfg: FinetuneSpec, model_path: str, train_examples: list[dict], val_examples: list[dict],
          out_dir: Path, checkpoint_dir: Path, on_step: Callable[[int], None] | None = None,
          progress: bool = True) -> dict:
    """Fine-tune; writes ``out_dir/adapter`` (safetensors + config + tokenizer) and
    ``out_dir/train_log.csv``; returns the training metrics. ``on_step(step)`` is called
    after every optimizer step (tests use it to interrupt a run)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device, dtype, autocast = pick_device(cfg.precision)
    check_safe_weights(Path(model_path))
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, use_safetensors=True,
                                                trust_remote_code=False)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    model = get_peft_model(base, cfg.method.peft_config(base)).to(device)
    # Head only on answer positions, where the model takes logits_to_keep positions and no
    # virtual tokens shift them (prompt tuning prepends some).
    keep_logits = ("logits_to_keep" in inspect.signature(base.forward).parameters
                   and cfg.method.kind != "prompt_tuning")
    amp = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    encoded = [encode(e, tokenizer) for e in train_examples]
    kept = [e for e in encoded if len(e[0]) <= cfg.max_seq_len]
    skipped = len(encoded) - len(kept)
    if not kept:
        raise StageError(f"finetune: no training example fits max_seq_len={cfg.max_seq_len}")
    val = [e for e in (encode(x, tokenizer) for x in val_examples[:cfg.eval_examples]) if len(e[0]) <= cfg.max_seq_len]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    schedule = lambda step: min(1.0, (step + 1) / max(cfg.warmup_steps, 1)) * (  # noqa: E731
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, cfg.max_steps) / cfg.max_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    state = {"step": 0, "tokens": 0, "seconds": 0.0, "best_val": None, "bad_evals": 0, "log": []}
    resumed_from = _load_checkpoint(checkpoint_dir, model, optimizer, scheduler, state)
    lengths = [len(ids) for ids, _ in kept]
    # Every epoch has the same number of batches; plan only the epochs max_steps can reach.
    per_epoch = len(batches(lengths, cfg.batch_size, cfg.seed, 0))
    epochs = math.ceil(cfg.max_steps * cfg.grad_accum / per_epoch)
    plan = [b for epoch in range(epochs) for b in batches(lengths, cfg.batch_size, cfg.seed, epoch)]
    adapter_dir = out_dir / "adapter"

    def evaluate() -> float | None:
        if not val:
            return None
        model.eval()
        losses = []
        with torch.no_grad():
            for i in range(0, len(val), cfg.batch_size):
                ids, labels, mask = (t.to(device) for t in collate(val[i:i + cfg.batch_size], tokenizer.pad_token_id))
                with amp():
                    losses.append(answer_loss(model, ids, mask, labels, keep_logits).item())
        model.train()
        return sum(losses) / len(losses)

    if resumed_from and (checkpoint_dir / "best").exists():
        shutil.copytree(checkpoint_dir / "best", adapter_dir, dirs_exist_ok=True)
    model.train()
    started = time.perf_counter() - state["seconds"]
    stopped = "max_steps"
    bar = _progress(progress, cfg.max_steps, state["step"])
    with bar:
        task = bar.add_task("finetune", total=cfg.max_steps, completed=state["step"], loss=float("nan"), tps=0.0)
        while state["step"] < cfg.max_steps:
            micro = plan[state["step"] * cfg.grad_accum:(state["step"] + 1) * cfg.grad_accum]
            loss_sum = 0.0
            for b in micro:
                ids, labels, mask = (t.to(device) for t in collate([kept[j] for j in b], tokenizer.pad_token_id))
                with amp():
                    loss = answer_loss(model, ids, mask, labels, keep_logits) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.item()
                state["tokens"] += int(mask.sum())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["seconds"] = time.perf_counter() - started
            tps = state["tokens"] / max(state["seconds"], 1e-9)
            row = {"step": state["step"], "loss": round(loss_sum, 5), "learning_rate": scheduler.get_last_lr()[0],
                   "tokens_per_s": round(tps, 1), "val_loss": ""}
            if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.max_steps:
                val_loss = evaluate()
                row["val_loss"] = "" if val_loss is None else round(val_loss, 5)
                if val_loss is not None and (state["best_val"] is None or val_loss < state["best_val"]):
                    state["best_val"], state["bad_evals"] = val_loss, 0
                    _save_adapter(model, tokenizer, adapter_dir)
                elif val_loss is not None:
                    state["bad_evals"] += 1
            state["log"].append(row)
            tracking.log_metrics({"train_loss": row["loss"], "learning_rate": row["learning_rate"],
                                  "tokens_per_s": row["tokens_per_s"]}
                                 | ({"val_loss": row["val_loss"]} if row["val_loss"] != "" else {}), step=state["step"])
            bar.update(task, completed=state["step"], loss=loss_sum, tps=tps)
            if progress and not bar.console.is_terminal and row["val_loss"] != "":
                # no live bar in a log file: one line per validation measurement instead
                left = (cfg.max_steps - state["step"]) * state["seconds"] / max(state["step"] - (resumed_from or 0), 1)
                bar.console.print(f"finetune step {state['step']}/{cfg.max_steps} loss {loss_sum:.4f} "
                                  f"val_loss {row['val_loss']} {tps:.0f} tok/s, ~{left / 60:.1f} min left",
                                  highlight=False)
            if state["step"] % cfg.checkpoint_every == 0 and state["step"] < cfg.max_steps:
                _save_checkpoint(checkpoint_dir, model, tokenizer, optimizer, scheduler, state, adapter_dir)
            if on_step:
                on_step(state["step"])
            if state["bad_evals"] >= cfg.early_stopping_patience:
                stopped = "early_stopping"
                break
            if cfg.max_minutes and state["seconds"] > cfg.max_minutes * 60:
                stopped = "max_minutes"
                break
    if not val:
        _save_adapter(model, tokenizer, adapter_dir)  # nothing to select on: the last weights
    elif state["log"] and state["log"][-1]["val_loss"] == "":
        final_val = evaluate()  # steps since the last measurement count too
        if state["best_val"] is None or final_val < state["best_val"]:
            state["best_val"] = final_val
            _save_adapter(model, tokenizer, adapter_dir)
    _write_log(out_dir / "train_log.csv", state["log"])
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: nothing left to resume
    return {"steps": state["step"], "stopped_by": stopped, "resumed_from_step": resumed_from,
            "train_loss_last": state["log"][-1]["loss"] if state["log"] else None,
            "best_val_loss": None if state["best_val"] is None else round(state["best_val"], 5),
            "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
            "minutes": round(state["seconds"] / 60, 2), "trainable_params": trainable, "total_params": total,
            "trainable_share": round(trainable / total, 5), "examples": len(kept), "skipped_too_long": skipped,
            "device": str(device), "dtype": str(dtype).replace("torch.", "")
            + (f" ({str(autocast).replace('torch.', '')} autocast)" if autocast else "")}


def _progress(enabled: bool, total: int, done: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled, transient=False)


def _save_adapter(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _save_checkpoint(folder: Path, model, tokenizer, optimizer, scheduler, state: dict, adapter_dir: Path) -> None:
    import torch

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_adapter(model, tokenizer, tmp / "adapter")
    if adapter_dir.exists():
        shutil.copytree(adapter_dir, tmp / "best")
    # Optimizer state holds only tensors and numbers: loaded back with weights_only=True.
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "python_rng": random.getstate()}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a checkpoint appears whole or not at all


def _load_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> int | None:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (folder / "state.json").exists():
        return None
    saved = json.loads((folder / "state.json").read_text())
    set_peft_model_state_dict(model, load_file(folder / "adapter" / "adapter_model.safetensors"))
    trainer = torch.load(folder / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["torch_rng"])
    rng = saved.pop("python_rng")
    random.setstate((rng[0], tuple(rng[1]), rng[2]))
    state.update(saved)
    return state["step"]


def _write_log(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "learning_rate", "tokens_per_s", "val_loss"])
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- the stage

def run(cfg: FinetuneSpec, io: StageIO) -> StageResult:
    """Fine-tune the base model on prepare's train split, resuming an interrupted run."""
    from components.prepare import read_examples

    src = io.inputs["prepare"]
    try:
        model_path = resolve(cfg.base_model, io.models, io.state_dir)
    except ModelError as exc:
        raise StageError(f"finetune.base_model: {exc}") from exc
    train_examples = read_examples(src / "train.jsonl")
    val_examples = read_examples(src / "validation.jsonl")
    # Same config and same data -> same checkpoint folder, so a restarted run resumes.
    key = hashlib.sha256((cfg.model_dump_json() + file_sha256(src / "train.jsonl")).encode()).hexdigest()[:16]
    checkpoints = io.state_dir / "checkpoints" / io.pipeline / f"finetune-{key}"
    for split, examples, context in (("train", train_examples, "training"), ("validation", val_examples, "eval")):
        path = src / f"{split}.jsonl"
        tracking.log_dataset(path, file_sha256(path), f"{io.pipeline}-{split}", context, rows=len(examples))
    metrics = train(cfg, model_path, train_examples, val_examples, io.out_dir, checkpoints)
    tracking.log_artifacts(io.out_dir / "adapter", "adapter")
    rows = [{k: metrics[k] for k in ("steps", "stopped_by", "train_loss_last", "best_val_loss", "tokens_per_s",
                                     "minutes", "trainable_params", "device")}]
    summary = (f"### finetune\n{cfg.method.kind} on `{cfg.base_model}`, {metrics['examples']} examples"
               + (f", resumed from step {metrics['resumed_from_step']}" if metrics["resumed_from_step"] else "")
               + ".\n\n" + markdown_table(rows))
    return StageResult(outputs={"adapter": io.out_dir / "adapter", "train_log": io.out_dir / "train_log.csv"},
                       metrics=metrics, summary=summary)
