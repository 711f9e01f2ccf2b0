"""The model catalog (the provisioned SmolLM2, converted from GGUF; reference resolution)
and the one loader (components/lm.py: safetensors or ONNX only, recorded hashes checked, no
remote code) on the tiny model the tests build."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from components.base import file_sha256
from components.catalog import MANIFEST, ModelError, pull, resolve
from components.lm import decoder_layers, load
from llmops.spec import load_spec
from tests.conftest import REPO


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
