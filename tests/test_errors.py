"""Bad input gets a clear error naming the problem, and leaves the engine usable."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from parity import Engine, PromptTooLongError, SamplingParams
from parity.models.config import UnsupportedModelError
from parity.models.weights import WeightError


@pytest.fixture(scope="module")
def engine(llama_dir):
    return Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", max_model_len=64)


def copy_model(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_unknown_architecture(llama_dir, tmp_path):
    path = copy_model(llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        Engine.from_pretrained(path)


def test_missing_weight_named(llama_dir, tmp_path):
    path = copy_model(llama_dir, tmp_path / "m")
    weights = load_file(f"{path}/model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, f"{path}/model.safetensors")
    with pytest.raises(WeightError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        Engine.from_pretrained(path)


def test_mis_shaped_weight_named(llama_dir, tmp_path):
    path = copy_model(llama_dir, tmp_path / "m")
    weights = load_file(f"{path}/model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = weights["model.layers.0.self_attn.k_proj.weight"][:8]
    save_file(weights, f"{path}/model.safetensors")
    with pytest.raises(WeightError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(8, 64\).*\(32, 64\)"):
        Engine.from_pretrained(path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Engine.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", ["fp8", "float64", "bfloat"])
def test_wrong_dtype_name(llama_dir, bad):
    with pytest.raises(ValueError, match=f"unknown dtype '{bad}'.*fp16, bf16, fp32"):
        Engine.from_pretrained(llama_dir, dtype=bad)


def test_unknown_engine_option(llama_dir):
    with pytest.raises(TypeError, match="max_batch"):
        Engine.from_pretrained(llama_dir, max_batch=3)


def test_empty_prompt(engine):
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("")


def test_prompt_longer_than_context_rejected_alone(engine):
    ok = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3))
    with pytest.raises(PromptTooLongError, match="prompt of 80 tokens.*max_model_len=64"):
        engine.add_request(list(range(3, 83)), SamplingParams(max_tokens=3))
    done = []
    while engine.has_unfinished():
        done.extend(engine.step())
    assert [r.request_id for r in done] == [ok] and len(done[0].output_ids) == 3


def test_generate_validates_every_prompt_before_starting(engine):
    with pytest.raises(PromptTooLongError, match="prompt 1"):
        engine.generate([[5, 6], list(range(3, 83))])
    assert not engine.has_unfinished()


def test_request_larger_than_whole_kv_cache(llama_dir):
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    small = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", kv_cache_memory=2 * per_block)
    with pytest.raises(PromptTooLongError, match="needs 3 KV blocks but the cache has 2"):
        small.add_request(list(range(3, 40)), SamplingParams(max_tokens=4))


def test_token_id_outside_vocabulary(engine):
    with pytest.raises(ValueError, match="token id 99999 outside the vocabulary"):
        engine.add_request([1, 99999])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n must"), ({"max_tokens": 0}, "max_tokens")],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
