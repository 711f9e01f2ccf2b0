"""The training loop, one for every recipe that trains (fine-tuning, distillation).

What a recipe brings: the model (its trainable parameters are those with
``requires_grad``), a loss on one batch, the encoded examples, and how to save the best
weights. What the loop does: batches of similar length in a seeded order, gradient
accumulation, AdamW, the cosine schedule with warmup and a floor from transformers,
gradient clipping, validation every ``eval_every`` steps (the best weights are kept; early
stopping), checkpoints every ``checkpoint_every`` steps that a killed run resumes from,
a progress bar (one plain line per validation in a log file), per-step MLflow metrics.

The number of steps decides what is trained, never the clock: ``max_minutes`` is a safety
stop that fails the stage loudly (its checkpoint kept, so the next run resumes), so a slow
machine gets the same model later, not a weaker one sooner.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from components import tracking
from components.base import StageError, StrictModel
from components.lm import collate, pick_device

LOG_COLUMNS = ("step", "loss", "learning_rate", "tokens_per_s", "val_loss")


class TrainingSpec(StrictModel):
    """The knobs every training recipe shares."""

    max_steps: int = Field(200, gt=0)  # optimizer steps: this decides what is trained
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)  # optimizer step every N batches: effective batch = batch_size x N
    learning_rate: float = Field(1e-3, gt=0)  # peak, after warmup
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # the cosine decays to this share of the peak
    max_seq_len: int = Field(384, gt=0)  # longer examples are skipped (and counted)
    eval_every: int = Field(25, gt=0)  # steps between validation-loss measurements
    eval_examples: int = Field(64, gt=0)  # validation examples used for that loss
    early_stopping_patience: int = Field(3, gt=0)
    checkpoint_every: int = Field(25, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # fp32: the same result on every CPU
    seed: int = 7
    max_minutes: float | None = Field(None, gt=0)  # safety stop: past it the stage fails (and can resume)


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


def train(model, loss_fn: Callable, items: list[tuple[list[int], list[int]]], val_items: list,
          cfg: TrainingSpec, tokenizer, save: Callable[[], None], checkpoint_dir: Path, name: str,
          log_file: Path | None = None, on_step: Callable[[int], None] | None = None, progress: bool = True,
          ) -> dict:
    """Train ``model`` on encoded (ids, labels) ``items``; ``loss_fn(ids, mask, labels)``
    gives a batch's loss. At the end the weights with the best validation loss (the last
    ones, without validation examples) are put back and ``save()`` is called. Returns the
    run's numbers (steps, losses, speed).
    Raises StageError when ``cfg.max_minutes`` runs out (the checkpoint stays)."""
    import torch
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device, _, autocast = pick_device(cfg.precision)
    amp = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    kept = [e for e in items if len(e[0]) <= cfg.max_seq_len]
    if not kept:
        raise StageError(f"{name}: no training example fits max_seq_len={cfg.max_seq_len}")
    val = [e for e in val_items[:cfg.eval_examples] if len(e[0]) <= cfg.max_seq_len]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps,
                                                            min_lr_rate=cfg.min_lr_ratio)
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "best_val": None, "bad_evals": 0, "log": []}
    best: dict = {}  # the trainable weights at the best validation loss
    resumed_from = _load_checkpoint(checkpoint_dir, model, optimizer, scheduler, state, best)
    lengths = [len(ids) for ids, _ in kept]
    per_epoch = len(batches(lengths, cfg.batch_size, cfg.seed, 0))
    epochs = math.ceil(cfg.max_steps * cfg.grad_accum / per_epoch)  # plan only the epochs max_steps reaches
    plan = [b for epoch in range(epochs) for b in batches(lengths, cfg.batch_size, cfg.seed, epoch)]

    def batch_loss(group: list) -> torch.Tensor:
        ids, labels, mask = (t.to(device) for t in collate(group, tokenizer))
        with amp():
            return loss_fn(ids, mask, labels), int(mask.sum())

    def validation_loss() -> float | None:
        if not val:
            return None
        model.eval()
        with torch.no_grad():
            losses = [batch_loss(val[i:i + cfg.batch_size])[0].item() for i in range(0, len(val), cfg.batch_size)]
        model.train()
        return sum(losses) / len(losses)

    model.train()
    started = time.perf_counter() - state["seconds"]
    stopped = "max_steps"
    bar = _progress(progress, name)
    with bar:
        task = bar.add_task(name, total=cfg.max_steps, completed=state["step"], loss=float("nan"), tps=0.0)
        while state["step"] < cfg.max_steps:
            loss_sum = 0.0
            for b in plan[state["step"] * cfg.grad_accum:(state["step"] + 1) * cfg.grad_accum]:
                loss, tokens = batch_loss([kept[j] for j in b])
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                state["tokens"] += tokens
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
                val_loss = validation_loss()
                row["val_loss"] = "" if val_loss is None else round(val_loss, 5)
                if val_loss is not None and (state["best_val"] is None or val_loss < state["best_val"]):
                    state["best_val"], state["bad_evals"] = val_loss, 0
                    best.update(_trainable_state(model))
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
                bar.console.print(f"{name} step {state['step']}/{cfg.max_steps} loss {loss_sum:.4f} "
                                  f"val_loss {row['val_loss']} {tps:.0f} tok/s, ~{left / 60:.1f} min left",
                                  highlight=False)
            if on_step:
                on_step(state["step"])
            if state["bad_evals"] >= cfg.early_stopping_patience:
                stopped = "early_stopping"
                break
            timed_out = cfg.max_minutes and state["seconds"] > cfg.max_minutes * 60 and state["step"] < cfg.max_steps
            if state["step"] % cfg.checkpoint_every == 0 and state["step"] < cfg.max_steps or timed_out:
                _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, state, best)
            if timed_out:
                raise StageError(
                    f"{name}: max_minutes ({cfg.max_minutes:g}) ran out at step {state['step']} of {cfg.max_steps} "
                    f"({tps:.0f} tokens/s). max_minutes is a safety stop; max_steps decides what is trained. "
                    "Run the stage again to resume from this step, or raise max_minutes.")
    if val and state["log"] and state["log"][-1]["val_loss"] == "":
        final = validation_loss()  # the steps since the last measurement count too
        if state["best_val"] is None or final < state["best_val"]:
            state["best_val"] = final
            best.update(_trainable_state(model))
    if best:
        model.load_state_dict(best, strict=False)
    save()
    if log_file is not None:
        with open(log_file, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(state["log"])
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: nothing left to resume
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"steps": state["step"], "max_steps": cfg.max_steps, "stopped_by": stopped,
            "resumed_from_step": resumed_from,
            "train_loss_last": state["log"][-1]["loss"] if state["log"] else None,
            "best_val_loss": None if state["best_val"] is None else round(state["best_val"], 5),
            "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
            "minutes": round(state["seconds"] / 60, 2), "trainable_params": trainable, "total_params": total,
            "trainable_share": round(trainable / total, 5), "examples": len(kept),
            "skipped_too_long": len(items) - len(kept), "device": str(device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")
            + (f" ({str(autocast).replace('torch.', '')} autocast)" if autocast else ""),
            "peak_memory_mib": None if peak is None else round(peak, 1)}


def _progress(enabled: bool, name: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled, transient=False)


def _trainable_state(model) -> dict:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict, best: dict) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), tmp / "trainable.safetensors")
    if best:
        save_file(best, tmp / "best.safetensors")
    # Optimizer state holds only tensors and numbers: loaded back with weights_only=True.
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "python_rng": random.getstate()}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a checkpoint appears whole or not at all


def _load_checkpoint(folder: Path, model, optimizer, scheduler, state: dict, best: dict) -> int | None:
    import torch
    from safetensors.torch import load_file

    if not (folder / "state.json").exists():
        return None
    saved = json.loads((folder / "state.json").read_text())
    weights = load_file(folder / "trainable.safetensors")
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        raise StageError(f"{folder}: checkpoint does not fit the model ({len(missing)} unknown tensors); delete it")
    model.load_state_dict(weights, strict=False)
    if (folder / "best.safetensors").exists():
        best.update(load_file(folder / "best.safetensors"))
    trainer = torch.load(folder / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["torch_rng"])
    rng = saved.pop("python_rng")
    random.setstate((rng[0], tuple(rng[1]), rng[2]))
    state.update(saved)
    return state["step"]
