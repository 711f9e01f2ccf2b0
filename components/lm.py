"""Language models, for every stage and the endpoint: one loader, chat encoding, batched
greedy generation and teacher-forced scoring.

- :func:`load` takes a folder (safetensors for PyTorch, ``model.onnx`` for ONNX Runtime),
  optionally a PEFT adapter on top (merged when the method allows), and checks it first:
  safetensors or ONNX only (pickle can run code), ``trust_remote_code`` never set, and,
  when given, every file against the SHA-256 recorded for it.
- Chats are encoded through the tokenizer's chat template (never by tokenizing the
  template's text, which doubles special tokens on some tokenizers); labels count only the
  assistant's answer.
- :func:`generate` answers many prompts greedily in batches of similar length, left-padded;
  a ``stop_when`` predicate ends a row early once its text can no longer be a valid answer.
- :func:`teacher_forced` scores gold answers in one pass: perplexity and, optionally, the
  top-k next-token ids at each answer position (to compare two models).
The device and precision are chosen here too (:func:`pick_device`).
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from components.base import file_sha256
from components.catalog import ModelError

IGNORE = -100  # label of tokens that do not count in a loss
UNSAFE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
ONNX_FILE = "model.onnx"


# ---------------------------------------------------------------- device and precision

def pick_device(precision: str):
    """(device, dtype of the weights, autocast dtype or None) for ``auto | fp32 | bf16``.

    GPU: bf16 weights when asked, or for ``auto`` when the GPU has bf16. CPU: fp32 weights;
    ``bf16`` (or ``auto`` on a CPU with AVX512-BF16/AMX) adds bf16 autocast for the matrix
    products while the weights and optimizer stay fp32."""
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


def inference_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- loading

def is_onnx(folder: Path | str) -> bool:
    return (Path(folder) / ONNX_FILE).exists()


def check_safe_weights(folder: Path) -> None:
    """Raise ModelError unless ``folder`` holds safetensors or ONNX weights (pickle is refused)."""
    if not folder.is_dir():
        return  # a hub id: from_pretrained(use_safetensors=True) checks it
    if any(folder.glob("*.safetensors")) or is_onnx(folder):
        return
    unsafe = [p.name for pattern in UNSAFE_WEIGHTS for p in folder.glob(pattern)]
    why = f"only pickle-based weights ({', '.join(unsafe)})" if unsafe else "no .safetensors or ONNX weights"
    raise ModelError(f"{folder}: {why}; convert them to safetensors first (pickle weights can run code)")


def verify_files(folder: Path, expected: dict[str, str]) -> None:
    """Raise ModelError naming the first file of ``folder`` that is missing or whose SHA-256
    differs from ``expected`` (relative path -> hex digest)."""
    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise ModelError(f"{path}: missing (the version records its SHA-256)")
        actual = file_sha256(path)
        if actual != digest:
            raise ModelError(f"{path}: SHA-256 {actual[:12]}... does not match the recorded {digest[:12]}...; "
                             "refusing to load it")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True  # we pad token ids on purpose
    return tokenizer


def load(path: str | Path, adapter: Path | None = None, device=None, dtype=None, merge: bool = True,
         quantization_config=None, expected_sha256: dict[str, str] | None = None):
    """(tokenizer, model) in eval mode. ``path``: a folder with safetensors (PyTorch) or
    ``model.onnx`` (ONNX Runtime, CPU), or a hub id. ``adapter``: a PEFT adapter folder put
    on top (merged into the weights when the method allows: faster). ``expected_sha256``:
    file -> digest, checked before anything is read. Raises ModelError on unsafe, missing
    or altered files."""
    import torch

    folder = Path(path)
    if expected_sha256:
        verify_files(folder, expected_sha256)
    check_safe_weights(folder)
    if adapter is not None and not (adapter / "adapter_model.safetensors").exists():
        raise ModelError(f"{adapter}: no adapter_model.safetensors (run the finetune stage)")
    tokenizer = load_tokenizer(adapter if adapter is not None else path)
    if is_onnx(folder):
        from optimum.onnxruntime import ORTModelForCausalLM

        return tokenizer, ORTModelForCausalLM.from_pretrained(folder, use_cache=True, trust_remote_code=False)
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True,
                                                 trust_remote_code=False, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge and model.peft_config["default"].peft_type.value in ("LORA", "IA3"):
            model = model.merge_and_unload()
    if quantization_config is None:
        model = model.to(device or inference_device())
    return tokenizer, model.eval()


def size_mib(folder: Path) -> float:
    """MiB (2^20 bytes) of the weight files in ``folder`` and its subfolders."""
    patterns = ("*.safetensors", "*.onnx", "*.onnx_data", "*.onnx.data")
    return round(sum(f.stat().st_size for p in patterns for f in Path(folder).rglob(p)) / 2**20, 1)


def decoder_layers(model):
    """The model's stack of transformer blocks (the longest ModuleList of
    ``config.num_hidden_layers`` modules), whatever the architecture calls it."""
    import torch

    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not found:
        raise ModelError(f"{type(model).__name__}: no list of {n} transformer blocks found")
    return min(found, key=lambda item: item[0].count("."))


# ---------------------------------------------------------------- chats -> token ids

def prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """The chat up to the assistant's turn (``messages`` without an assistant message), as
    the model sees it when it answers."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def encode(messages: list[dict], tokenizer, name: str = "") -> tuple[list[int], list[int]]:
    """Token ids of a whole chat (its last message is the answer) and labels that count only
    the answer. Raises ModelError when the template renders the prompt differently with and
    without the answer (the prompt could not be masked)."""
    ids = tokenizer.apply_chat_template(messages)
    prompt = prompt_ids(messages[:-1], tokenizer)
    if ids[:len(prompt)] != prompt:
        raise ModelError(f"{name or 'a chat'}: the chat template renders the prompt differently with and without "
                         "the answer; cannot mask the prompt")
    return ids, [IGNORE] * len(prompt) + ids[len(prompt):]


def collate(items: list[tuple[list[int], list[int]]], tokenizer, side: str = "right"):
    """(input_ids, labels, attention_mask) tensors for (ids, labels) pairs, padded on ``side``
    with the tokenizer's pad token (labels with IGNORE)."""
    import torch

    batch = tokenizer.pad({"input_ids": [ids for ids, _ in items]}, padding=True, padding_side=side,
                          return_tensors="pt")
    width = batch["input_ids"].shape[1]
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, (_, y) in enumerate(items):
        if side == "right":
            labels[row, :len(y)] = torch.tensor(y)
        else:
            labels[row, width - len(y):] = torch.tensor(y)
    return batch["input_ids"], labels, batch["attention_mask"]


def answer_positions(labels):
    """(positions whose logits predict an answer token, from the batch's first answer on; the
    tokens they predict, IGNORE where not an answer). Position p predicts token p + 1."""
    import torch

    answer = labels != IGNORE
    starts = torch.where(answer.any(1), answer.int().argmax(1), labels.shape[1])
    first = max(int(starts.min()) - 1, 0)
    return torch.arange(first, labels.shape[1] - 1, device=labels.device), labels[:, first + 1:]


def takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def answer_logits(model, ids, mask, labels):
    """(logits at the positions that predict answer tokens, the tokens they predict): the
    output head runs only from the batch's first answer position on where the model allows
    it; its 49k-way logits at prompt positions are most of the head's work and count for
    nothing in an answer loss."""
    if takes_logits_to_keep(model):
        keep, target = answer_positions(labels)
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits, target
    return model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:]


def answer_loss(model, ids, mask, labels):
    """Mean cross-entropy over the answer tokens (what ``model(labels=labels).loss`` computes)."""
    import torch

    logits, target = answer_logits(model, ids, mask, labels)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE)


# ---------------------------------------------------------------- generation and scoring

@dataclass
class Generated:
    texts: list[str]  # the answers, in the prompts' order
    tokens: int  # generated tokens, the end token included
    seconds: float


class _StopDeadRows:
    """A stopping criterion that ends each row whose text ``stop_when`` says is finished."""

    def __init__(self, tokenizer, width: int, stop_when: Callable[[str], bool]):
        self.tokenizer, self.width, self.stop_when = tokenizer, width, stop_when

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor([self.stop_when(self.tokenizer.decode(row[self.width:], skip_special_tokens=True))
                             for row in input_ids.tolist()], dtype=torch.bool, device=input_ids.device)


def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
             stop_when: Callable[[str], bool] | None = None, on_batch: Callable[[int], None] | None = None,
             ) -> Generated:
    """Greedy answers to token-id prompts, in batches of similar length (left padding).
    ``stop_when(text)`` ends a row as soon as it returns True (e.g. the text can no longer
    become a valid answer): a cut that changes no score, only the time."""
    import torch
    from transformers import StoppingCriteriaList

    device = getattr(model, "device", None) or inference_device()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    generated, started = 0, time.perf_counter()
    end = tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, _, mask = collate([(prompts[i], []) for i in idx], tokenizer, side="left")
        width = ids.shape[1]
        criteria = StoppingCriteriaList([_StopDeadRows(tokenizer, width, stop_when)]) if stop_when else None
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=end, stopping_criteria=criteria)
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            new = new[:new.index(end) + 1] if end in new else new
            while len(new) > 1 and new[-1] == new[-2] == tokenizer.pad_token_id:  # padding after a stop
                new.pop()
            generated += len(new)
            texts[i] = tokenizer.decode(new, skip_special_tokens=True)
        if on_batch:
            on_batch(len(idx))
    return Generated(texts, generated, time.perf_counter() - started)


def teacher_forced(model, tokenizer, chats: list[list[dict]], batch_size: int, top_k: int = 0,
                   ) -> tuple[float, list]:
    """One teacher-forced pass over ``chats`` (each ending with its gold answer):
    (perplexity of the answer tokens, the end token included; per chat the ``top_k``
    next-token ids at each answer position, [] when ``top_k`` is 0)."""
    import torch

    encoded = [encode(c, tokenizer) for c in chats]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    device = getattr(model, "device", None) or inference_device()
    tops: list = [[] for _ in encoded]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, labels, mask = (t.to(device) for t in collate([encoded[i] for i in idx], tokenizer))
            logits, target = answer_logits(model, ids, mask, labels)
            logits = logits.float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum").item()
            count += int((target != IGNORE).sum())
            if top_k:
                best = logits.topk(top_k, dim=-1).indices.cpu()
                for row, i in enumerate(idx):
                    tops[i] = best[row][(target[row] != IGNORE).cpu()].numpy()
    return round(math.exp(nll / max(count, 1)), 4), tops
