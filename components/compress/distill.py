"""Distillation: a student with fewer blocks learns the teacher's softened next-token
distribution on the answers of the training chats, on the shared training loop
(components/training.py).

Loss, on answer positions only: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) *
CE(student, gold)``; the T^2 keeps the soft term's gradient on the scale of the hard one.
The student is a copy of the teacher keeping ``layers`` evenly spaced blocks (whatever the
architecture calls them), or another local model with the same tokenizer. The token
embedding (tied to the output head in small models) stays frozen: shared with the
teacher's vocabulary, and the costliest part to train.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from components.base import StageError, StrictModel
from components.catalog import ModelError, resolve
from components.lm import IGNORE, answer_positions, decoder_layers, encode, load, pick_device
from components.training import TrainingSpec, train


class StudentSpec(StrictModel):
    layers: int | None = Field(15, gt=0)  # a copy of the teacher keeping this many evenly spaced blocks
    model: str | None = None  # or another local model (catalog name or folder) with the same tokenizer

    @model_validator(mode="after")
    def _one(self):
        if (self.layers is None) == (self.model is None):
            raise ValueError("give exactly one of student.layers and student.model")
        return self


class DistilledSpec(TrainingSpec):
    student: StudentSpec = StudentSpec()
    temperature: float = Field(2.0, gt=0)  # softens both distributions; the KL term is scaled by T^2
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft (KL) term; 1 - alpha on the gold answers
    max_steps: int = Field(120, gt=0)
    batch_size: int = Field(4, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    eval_every: int = Field(1_000_000, gt=0)  # no validation by default: the variant is measured after


def distillation_loss(student_logits, teacher_logits, target, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, target), each a
    mean over the positions given (rows of the logits; ``target`` holds the gold next
    tokens). Returns (loss, kl, ce)."""
    import torch.nn.functional as F

    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    ce = F.cross_entropy(student_logits.float(), target)
    return alpha * t * t * kl + (1 - alpha) * ce, kl, ce


def make_student(teacher: Path, spec: StudentSpec, models: dict, state_dir: Path):
    """The student: a copy of the teacher keeping ``layers`` evenly spaced blocks (first and
    last included), or another local model that shares the teacher's tokenizer."""
    import torch

    if spec.model is not None:
        try:
            tokenizer, student = load(resolve(spec.model, models, state_dir), device=torch.device("cpu"))
        except ModelError as exc:
            raise StageError(f"distilled.student.model: {exc}") from exc
        if tokenizer.get_vocab() != load(teacher, device=torch.device("cpu"))[0].get_vocab():
            raise StageError(f"distilled.student.model {spec.model!r}: its tokenizer differs from the teacher's; "
                             "distillation compares next-token distributions, so the vocabularies must be the same")
        return student
    _, student = load(teacher, device=torch.device("cpu"))
    path, blocks = decoder_layers(student)
    n = len(blocks)
    if spec.layers >= n:
        raise StageError(f"distilled.student.layers {spec.layers}: the teacher has only {n} blocks; a student "
                         "needs fewer")
    keep = sorted({round(i * (n - 1) / max(spec.layers - 1, 1)) for i in range(spec.layers)})
    parent, _, attr = path.rpartition(".")
    kept = torch.nn.ModuleList(blocks[i] for i in keep)
    setattr(student.get_submodule(parent) if parent else student, attr, kept)
    for index, block in enumerate(kept):
        for module in block.modules():  # the KV cache is indexed by position in the stack
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def distill(teacher_dir: Path, out: Path, cfg: DistilledSpec, train_examples: list[dict], models: dict,
            state_dir: Path, checkpoint_dir: Path, progress: bool = True) -> dict:
    """Train the student and save it (safetensors) in ``out``; returns what it did."""
    import torch

    device, dtype, _ = pick_device(cfg.precision)
    tokenizer, teacher = load(teacher_dir, device=device)
    teacher.to(dtype).eval()
    student = make_student(teacher_dir, cfg.student, models, state_dir).to(device, dtype).train()
    student.get_input_embeddings().weight.requires_grad_(False)
    last: dict = {}

    def loss(ids, mask, labels):
        keep, target = answer_positions(labels)  # the output head only from the first answer on
        answer = target != IGNORE
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[answer]
        s_logits = student(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[answer]
        value, kl, ce = distillation_loss(s_logits, t_logits, target[answer], cfg.temperature, cfg.alpha)
        last.update(kl=round(kl.item(), 4), ce=round(ce.item(), 4))
        return value

    def save() -> None:
        student.to(torch.float32).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    encoded = [encode(e["messages"], tokenizer, e.get("ticket_id", "")) for e in train_examples]
    done = train(student, loss, encoded, [], cfg, tokenizer, save, checkpoint_dir, "distill", progress=progress)
    return {"format": "safetensors", "student_layers": student.config.num_hidden_layers,
            "student_params": done["total_params"], "trained_params": done["trainable_params"],
            "steps": done["steps"], "minutes": done["minutes"], "final_loss": done["train_loss_last"],
            **{f"final_{k}": v for k, v in last.items()}}
