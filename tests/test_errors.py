"""Bad input gets a clear error naming the problem, and leaves the engine usable."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from parity import Engine, PromptTooLongError, SamplingParams
from parity.models.config import UnsupportedModelError
from parity.models.weights import WeightError, hf_named_weights


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
    with pytest.raises(ValueError, match=r"token id 99999 at position 1 is outside the vocabulary \[0, "):
        engine.add_request([1, 99999])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n must"), ({"max_tokens": 0}, "max_tokens")],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------------- failures inside a step, bad requests
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROBE = [[5, 6, 7, 8], [9, 10, 11]]


def probe(engine) -> list[tuple[list[int], list[float]]]:
    return [(r.output_ids, r.output_logprobs) for r in engine.generate(PROBE, GREEDY)]


def test_failing_step_fails_its_requests_and_leaves_the_engine_usable(llama_dir):
    from parity.precision.policy import NonFiniteActivationError

    engine = Engine.from_pretrained(llama_dir, dtype="fp16", device="cpu", max_model_len=64)
    reference = probe(engine)
    good = {k: v.clone() for k, v in hf_named_weights(engine.model)}
    engine.update_weights({k: v.float() * 3000 for k, v in good.items()})  # finite, but activations overflow fp16

    with pytest.raises(NonFiniteActivationError, match="update_weights"):
        engine.generate(PROBE, GREEDY)
    assert not engine.has_unfinished() and engine.kv_cache_usage()["used_blocks"] == 0

    engine.add_request([5, 6, 7], GREEDY, request_id="a")
    engine.add_request([8, 9], SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=1), request_id="b")
    failed = engine.step()
    assert sorted((r.request_id, r.sample_index) for r in failed) == [("a", 0), ("b", 0), ("b", 1)]
    assert all(r.finish_reason == "error" and "NonFiniteActivationError" in r.error for r in failed)
    assert not engine.has_unfinished() and engine.kv_cache_usage()["used_blocks"] == 0
    engine.sleep()  # an idle engine: sleep and wake work
    engine.wake_up()

    engine.update_weights(good)
    assert probe(engine) == reference


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([1.7, 2.2], r"prompt 0: the token at position 0 must be an int id, got 1\.7"),
        ([5, True], r"prompt 0: the token at position 1 must be an int id, got True"),
        ([5, "6"], r"prompt 0: the token at position 1 must be an int id, got '6'"),
        (None, "prompt 0: expected text, a list of token ids or a list of chat messages, got NoneType"),
        ("tensor", r"prompt 0: .*got Tensor \(pass tensor.tolist\(\)\)"),
        (["Hello", "there"], "prompt 0: a list of strings is not one prompt"),
    ],
)
def test_bad_prompt_refused_before_anything_is_queued(engine, prompt, message):
    import torch

    prompt = torch.tensor([5, 6]) if prompt == "tensor" else prompt
    reference = probe(engine)
    with pytest.raises(ValueError, match=message):
        engine.generate([prompt, [5, 6, 7]], GREEDY)
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match=message.replace("prompt 0", "request 'x'")):
        engine.add_request(prompt, GREEDY, request_id="x")
    assert not engine.has_unfinished()
    assert probe(engine) == reference


def test_bad_params_in_a_batch_refused_before_anything_is_queued(engine):
    reference = probe(engine)
    with pytest.raises(ValueError, match="prompt 1: params must be a SamplingParams, got dict"):
        engine.generate(PROBE, [GREEDY, {"temperature": 0}])
    assert not engine.has_unfinished()
    assert probe(engine) == reference


def test_duplicate_request_id_of_a_running_request(engine):
    reference = probe(engine)
    engine.add_request([5, 6, 7, 8], GREEDY, request_id="same")
    with pytest.raises(ValueError, match="request_id 'same' is already in flight"):
        engine.add_request([9, 10, 11], GREEDY, request_id="same")
    done = []
    while engine.has_unfinished():
        done.extend(engine.step())
    assert [(r.request_id, r.output_ids) for r in done] == [("same", reference[0][0])]
    engine.add_request([9, 10], GREEDY, request_id="same")  # finished: the id is free again
    while engine.has_unfinished():
        engine.step()
    assert probe(engine) == reference


def test_per_sample_seeds_are_hashed_not_consecutive(engine):
    import hashlib

    from parity.engine.engine import sample_seed

    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=100, ignore_eos=True)
    three = engine.generate([[5, 6, 7]], params)
    (one,) = engine.generate([[5, 6, 7]], SamplingParams(temperature=1.0, max_tokens=8, seed=101, ignore_eos=True))
    assert three[1].output_ids != one.output_ids
    digest = hashlib.blake2b(b"100,1", digest_size=8).digest()
    assert sample_seed(100, 1) == int.from_bytes(digest, "little") & (2**63 - 1)
    # still independent of the batch: the same request beside others samples the same tokens
    mixed = engine.generate([[9, 9, 9], [5, 6, 7], [4]], [GREEDY, params, params])
    assert [r.output_ids for r in mixed[1:4]] == [r.output_ids for r in three]
