"""The model catalog (the provisioned SmolLM2, converted from GGUF, its tokenizer loading
from tokenizer.json alone, a folder provisioned before that fixed in place; reference
resolution) and the one loader (components/lm.py: safetensors or ONNX only, recorded hashes
checked, no remote code) on the tiny model the tests build."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch

from components.base import file_sha256
from components.catalog import MANIFEST, ModelError, pull, resolve, weights_sha256
from components.lm import decoder_layers, load, load_tokenizer
from llmops.spec import load_spec
from tests.components.conftest import assert_fast_tokenizer, triage_examples
from tests.conftest import REPO

# Texts beside the task's prompts: unicode, whitespace, digits, special tokens as text.
TEXTS = ["", "  two  spaces\n\ttab\r\nwindows\n\n", "Grüße aus Köln, ça va? 日本語のチケット 😀👍🏽 مرحبا",
         "e\u0301 \u200bzero width\u00a0no-break", "INV-20725 2026-08-26T04:50:32+00:00 12345678901234567890 3.14 +1",
         "literal <|im_end|> and <|im_start|>user in text", '{"intent": "billing_refund", "priority": "urgent"}']


@pytest.fixture(scope="module")
def smollm2_dir():
    """The default base model, provisioned as `make setup` does (instant when present)."""
    spec = load_spec(REPO / "pipelines.yaml", env={})
    _, where = pull("smollm2-135m-instruct", spec.models["smollm2-135m-instruct"], spec.state_dir(REPO))
    return where


def load_causal_lm(path):
    return load(path, device=torch.device("cpu"))


@pytest.fixture
def tiny_dir(tiny):
    return tiny


def test_provisioned_smollm2_has_the_fixed_tokenizer(smollm2_dir):
    manifest = json.loads((Path(smollm2_dir) / MANIFEST).read_text())
    assert 134_000_000 < manifest["parameters"] < 135_000_000
    tokenizer, model = load_causal_lm(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2 and model.generation_config.eos_token_id == 2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    # no doubled <|im_start|>: tokenizing the template's text equals the template's own ids
    assert ids[0].tolist() == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0].tolist().count(start) == text.count("<|im_start|>")  # one per turn, none added
    assert ids[0, 0].item() == start and ids[0, 1].item() != start
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == 2 or len(out[0]) - ids.shape[1] == 12  # stops at <|im_end|>


def ticket_texts() -> list[str]:
    return TEXTS + [m["content"] for example in triage_examples(6) for m in example["messages"]]


def test_provisioned_tokenizer_loads_from_tokenizer_json_alone(smollm2_dir):
    folder = Path(smollm2_dir)
    assert_fast_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["eos_token"], config["pad_token"]) == (False, "<|im_end|>", "<|im_end|>")
    tokenizer = load_tokenizer(folder)
    assert type(tokenizer).__name__ == "PreTrainedTokenizerFast" and tokenizer.padding_side == "left"
    assert sorted(tokenizer("x")) == ["attention_mask", "input_ids"]  # no token_type_ids for the model
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = ticket_texts()
    assert [tokenizer(t).input_ids for t in texts] == [reference.encode(t).ids for t in texts]
    for example in triage_examples(3):
        text = tokenizer.apply_chat_template(example["messages"], tokenize=False)
        assert tokenizer.apply_chat_template(example["messages"]) == reference.encode(text).ids


def write_old_tokenizer(fixed: Path, folder: Path) -> None:
    """``fixed``'s tokenizer files as conversions wrote them before: tokenizer_config.json
    naming LlamaTokenizer (no model_input_names, no padding_side), and a tokenizer.model."""
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja", MANIFEST):
        shutil.copy(fixed / name, folder / name)
    config = json.loads((fixed / "tokenizer_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("model_input_names", "padding_side")}
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "LlamaTokenizer"},
                                                             indent=2) + "\n")
    (folder / "tokenizer.model").write_bytes(b"GGUF" + bytes(4096))  # a copy of the GGUF file, in short


def test_a_folder_provisioned_before_gets_the_fixed_tokenizer_in_place(smollm2_dir, tmp_path):
    from safetensors.torch import save_file

    spec = load_spec(REPO / "pipelines.yaml", env={})
    fixed = Path(smollm2_dir)
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    write_old_tokenizer(fixed, folder)
    save_file({"w": torch.arange(6.0)}, folder / "model.safetensors")  # weights stand-in: must stay as they are
    weights = (file_sha256(folder / "model.safetensors"), (folder / "model.safetensors").stat().st_mtime_ns)
    versions_record = weights_sha256(str(folder), tmp_path)
    old = load_tokenizer(folder)
    assert type(old).__name__ == "LlamaTokenizerFast"
    texts = ticket_texts()
    before = [old(t).input_ids for t in texts]
    chats = [example["messages"] for example in triage_examples(3)]
    rendered = [old.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]

    lines = []
    assert pull("smollm2-135m-instruct", spec.models["smollm2-135m-instruct"], tmp_path, log=lines.append) == (
        "ready", str(folder))
    assert lines == ["smollm2-135m-instruct: tokenizer files fixed in place (tokenizer_config.json: LlamaTokenizer "
                     "-> PreTrainedTokenizerFast; tokenizer.model removed (0.0 MiB)); weights untouched"]
    assert_fast_tokenizer(folder)
    # the same file a conversion writes now, the weights and their recorded hash as they were
    assert (folder / "tokenizer_config.json").read_bytes() == (fixed / "tokenizer_config.json").read_bytes()
    assert (file_sha256(folder / "model.safetensors"), (folder / "model.safetensors").stat().st_mtime_ns) == weights
    assert weights_sha256(str(folder), tmp_path) == versions_record
    new = load_tokenizer(folder)
    assert [new(t).input_ids for t in texts] == before  # the same ids as before the fix
    assert [new.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats] == rendered
    assert (new.eos_token_id, new.pad_token_id, new.padding_side) == (old.eos_token_id, old.pad_token_id, "left")
    lines.clear()
    pull("smollm2-135m-instruct", spec.models["smollm2-135m-instruct"], tmp_path, log=lines.append)
    assert lines == []  # once fixed, nothing more to do


def test_tiny_safetensors_model_loads(tiny_dir):
    tokenizer, model = load_causal_lm(str(tiny_dir))
    assert sum(p.numel() for p in model.parameters()) < 4_000_000
    assert tokenizer.eos_token_id == 2


def test_pickle_weights_are_refused(tmp_path, tiny_dir):
    folder = tmp_path / "pickled"
    _, model = load_causal_lm(str(tiny_dir))
    model.save_pretrained(folder, safe_serialization=False)
    assert (folder / "pytorch_model.bin").exists()
    with pytest.raises(ModelError, match=r"only pickle-based weights \(pytorch_model.bin\)"):
        load_causal_lm(str(folder))


def test_remote_code_is_never_run(tmp_path, tiny_dir):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    try:
        load_causal_lm(str(folder))
    except Exception:
        pass  # refusing is fine; running the file is not
    assert not marker.exists()


def test_resolve_references(tmp_path):
    spec = load_spec(REPO / "pipelines.yaml", env={})
    with pytest.raises(ModelError, match="run `llmops models pull`"):
        resolve("smollm2-135m-instruct", spec.models, tmp_path / "empty-state")
    assert resolve("all-minilm-l6-v2", spec.models, tmp_path).endswith("model")
    assert resolve(str(tmp_path), spec.models, tmp_path) == str(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        resolve("./no/such/folder", spec.models, tmp_path)
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct", spec.models, tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_recorded_hashes_are_checked_before_loading(tmp_path, tiny_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    recorded = {f.name: file_sha256(f) for f in folder.iterdir() if f.is_file()}
    load(folder, expected_sha256=recorded, device=torch.device("cpu"))  # intact: loads
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model.safetensors: SHA-256 .* does not match the recorded"):
        load(folder, expected_sha256=recorded)
    weights.unlink()
    with pytest.raises(ModelError, match=r"model.safetensors: missing"):
        load(folder, expected_sha256=recorded)


def test_blocks_are_found_whatever_the_architecture_calls_them(tiny_dir):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    _, llama = load_causal_lm(str(tiny_dir))
    assert decoder_layers(llama)[0] == "model.layers" and len(decoder_layers(llama)[1]) == 2
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3,
                                            num_attention_heads=2, intermediate_size=32))
    assert decoder_layers(neox)[0] == "gpt_neox.layers" and len(decoder_layers(neox)[1]) == 3
