"""finetune: supervised fine-tuning of the base model with a PEFT method, on CPU or GPU.

The examples are the chats written by ``prepare``; the loss counts only the assistant's
answer, and the output head runs only on answer positions (components/lm.py). The loop
(batching, schedule, validation, early stopping, checkpoints a killed run resumes from) is
components/training.py, shared with distillation.

The same code runs on a GPU worker: the device is picked at run time. ``qlora`` loads the
base model in 4-bit NF4 with double quantization and bf16 compute (bitsandbytes, a CUDA
GPU: `pip install '.[gpu]'`); the spec is refused where there is none.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from components import tracking
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table
from components.catalog import ModelError, base_model_path
from components.lm import answer_loss, encode, load_tokenizer, pick_device, takes_logits_to_keep
from components.reports import TrainingReport
from components.splits import read_examples
from components.training import TrainingSpec, train

OUTPUTS = ("adapter", "train_log.csv")


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
        if self.last_layers and self.last_layers > n_layers:
            raise StageError(f"finetune.method.last_layers {self.last_layers}: the model has only {n_layers} blocks")
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
    """LoRA on a base model quantized to 4-bit NF4 (double quantization, bf16 compute)."""

    kind: Literal["qlora"] = "qlora"

    @model_validator(mode="after")
    def _needs_cuda(self) -> "QloraMethod":
        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("qlora quantizes the base model to 4 bits with bitsandbytes and needs a CUDA GPU; "
                             "this machine has " + ("no CUDA GPU" if not torch.cuda.is_available()
                                                    else "no bitsandbytes (pip install '.[gpu]')")
                             + " (use kind: lora)")
        return self

    @staticmethod
    def quantization_config():
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)


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


class FinetuneSpec(TrainingSpec):
    base_model: str = "smollm2-135m-instruct"  # a catalog name, a local folder or a hub id
    method: Method = LoraMethod()
    gradient_checkpointing: bool = False  # less memory, ~30% slower


def peft_model(cfg: FinetuneSpec, model_path: str):
    """The base model with fresh adapters of ``cfg.method`` (4-bit base for qlora)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from components.lm import check_safe_weights

    device, dtype, _ = pick_device(cfg.precision)
    check_safe_weights(Path(model_path))
    quantized = isinstance(cfg.method, QloraMethod)
    extra = {"quantization_config": cfg.method.quantization_config(), "device_map": {"": 0}} if quantized else {}
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if quantized else dtype,
                                                use_safetensors=True, trust_remote_code=False, **extra)
    if quantized:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    model = get_peft_model(base, cfg.method.peft_config(base))
    return model if quantized else model.to(device)


def fit(cfg: FinetuneSpec, model_path: str, train_examples: list[dict], val_examples: list[dict],
        out_dir: Path, checkpoint_dir: Path, on_step=None, progress: bool = True) -> dict:
    """Fine-tune; writes ``out_dir/adapter`` (safetensors + config + tokenizer) and
    ``out_dir/train_log.csv``; returns the training numbers. ``on_step(step)`` is called
    after every optimizer step (tests use it to interrupt a run)."""
    tokenizer = load_tokenizer(model_path)
    model = peft_model(cfg, model_path)
    # The head runs only on answer positions where the model takes logits_to_keep and no
    # virtual tokens shift the positions (prompt tuning prepends some).
    head_on_answers = takes_logits_to_keep(model.get_base_model()) and cfg.method.kind != "prompt_tuning"

    def loss(ids, mask, labels):
        if not head_on_answers:
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return answer_loss(model, ids, mask, labels)

    def save() -> None:
        model.save_pretrained(out_dir / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "adapter")

    encoded = [encode(e["messages"], tokenizer, e.get("ticket_id", "")) for e in train_examples]
    val = [encode(e["messages"], tokenizer, e.get("ticket_id", "")) for e in val_examples[:cfg.eval_examples]]
    return train(model, loss, encoded, val, cfg, tokenizer, save, checkpoint_dir, "finetune",
                 log_file=out_dir / "train_log.csv", on_step=on_step, progress=progress)


def run(cfg: FinetuneSpec, io: StageIO) -> StageResult:
    """Fine-tune the base model on prepare's train split, resuming an interrupted run."""
    src = io.inputs["prepare"]
    model_path = base_model_path(io, cfg)
    train_examples = read_examples(src / "train.jsonl")
    val_examples = read_examples(src / "validation.jsonl")
    # Same config and same data -> same checkpoint folder, so a restarted run resumes.
    # The safety stop is not part of the key: raising it resumes the same run.
    key = hashlib.sha256((cfg.model_dump_json(exclude={"max_minutes"}) + file_sha256(src / "train.jsonl")
                          ).encode()).hexdigest()[:16]
    checkpoints = io.state_dir / "checkpoints" / io.pipeline / f"finetune-{key}"
    for split, examples, context in (("train", train_examples, "training"), ("validation", val_examples, "eval")):
        path = src / f"{split}.jsonl"
        tracking.log_dataset(path, file_sha256(path), f"{io.pipeline}-{split}", context, rows=len(examples))
    try:
        report = TrainingReport(**fit(cfg, model_path, train_examples, val_examples, io.out_dir, checkpoints))
    except ModelError as exc:
        raise StageError(str(exc)) from exc
    tracking.log_artifacts(io.out_dir / "adapter", "adapter")
    row = report.model_dump(include={"steps", "stopped_by", "train_loss_last", "best_val_loss", "tokens_per_s",
                                     "minutes", "trainable_params", "device"})
    summary = (f"### finetune\n{cfg.method.kind} on `{cfg.base_model}`, {report.examples} examples"
               + (f", resumed from step {report.resumed_from_step}" if report.resumed_from_step else "")
               + ".\n\n" + markdown_table([row]))
    return StageResult(outputs={"adapter": io.out_dir / "adapter", "train_log": io.out_dir / "train_log.csv"},
                       report=report, summary=summary)
