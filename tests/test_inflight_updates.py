"""Weight updates while requests run: refused updates leave them intact, "keep" and "recompute" modes,
per-token weight versions, and no prefix block of older weights served to a newer request. In
deterministic mode with "recompute", every token's logprob is the trainer-side forward's under the
weights that sampled it, bit for bit."""

from __future__ import annotations

import pytest
import torch

from parity import Engine, SamplingParams
from parity.models.weights import WeightError, hf_named_weights
from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

PROMPTS = [list(range(10, 31)), [5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
PARAMS = SamplingParams(n=2, temperature=0.9, max_tokens=12, seed=4, ignore_eos=True)


def make_engine(model_dir: str, device: str = "cpu") -> Engine:
    """Deterministic; on CUDA in bf16 with decode CUDA graphs (the weights are updated under them)."""
    return Engine.from_pretrained(model_dir, dtype="fp32" if device == "cpu" else "bf16", device=device,
                                  block_size=4, deterministic=True, max_num_batched_tokens=16)


def perturbed(engine: Engine, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: v + (scale * torch.randn(v.shape, generator=g)).to(v) * v.float().std().to(v)
            for k, v in hf_named_weights(engine.model)}


def start(engine: Engine, min_tokens: int = 4) -> None:
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, PARAMS, request_id=f"r{i}")
    while not (len(engine.scheduler.running) == 2 * len(PROMPTS)
               and min(len(s.output_ids) for s in engine.scheduler.running) >= min_tokens):
        engine.step()


def finish(engine: Engine) -> list:
    out = []
    while engine.has_unfinished():
        out.extend(engine.step())
    return sorted(out, key=lambda r: (r.request_id, r.sample_index))


def test_update_refused_while_requests_run_leaves_them_intact(llama_dir):
    engine = make_engine(llama_dir)
    reference = [(r.output_ids, r.output_logprobs) for r in engine.generate(PROMPTS, PARAMS)]
    start(engine)
    with pytest.raises(RuntimeError, match="in_flight='keep'"):
        engine.update_weights(perturbed(engine))
    with pytest.raises(ValueError, match="in_flight must be"):
        engine.update_weights(perturbed(engine), in_flight="pause")
    bad = perturbed(engine)
    bad["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    for mode in ("keep", "recompute"):
        with pytest.raises(WeightError, match="inf or nan"):
            engine.update_weights(bad, in_flight=mode)
    assert engine.weight_version == 0
    done = finish(engine)
    assert [(r.output_ids, r.output_logprobs) for r in done] == reference
    assert all(r.output_weight_versions == [0] * 12 for r in done)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["keep", "recompute"])
def test_update_with_requests_running(llama_dir, mode, device):
    engine = make_engine(llama_dir, device)
    trainer_v0 = parity_model_from_engine(engine, trainable=False)
    new_weights = perturbed(engine)
    start(engine)
    assert engine.scheduler.block_manager.cached  # prefixes of the old weights are cached
    before = {(s.request_id, s.sample_index): len(s.output_ids) for s in engine.scheduler.running}
    stats = engine.update_weights(new_weights, in_flight=mode)
    assert stats.weight_version == engine.weight_version == 1
    assert engine.scheduler.block_manager.cached == {}
    if mode == "recompute":
        assert engine.scheduler.running == [] and all(s.num_computed_tokens == 0 for s in engine.scheduler.waiting)
    else:
        assert all(s.num_computed_tokens > 0 for s in engine.scheduler.running)
    # A new request beside them is never served blocks of the old weights ("keep": the running requests
    # register none; "recompute": they register blocks recomputed under the new weights).
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3), request_id="new")
    done = finish(engine)
    new = next(r for r in done if r.request_id == "new")
    assert new.output_weight_versions == [1, 1, 1]
    assert (new.num_cached_prompt_tokens == 0) == (mode == "keep")
    old = [r for r in done if r.request_id != "new"]
    for r in old:
        k = before[(r.request_id, r.sample_index)]
        assert r.output_weight_versions == [0] * k + [1] * (12 - k) and r.weight_version == 1
    trainer_v1 = parity_model_from_engine(engine, trainable=False)
    (lp_new,) = token_logprobs(trainer_v1, [new.prompt_ids], [new.output_ids], temperature=1.0)
    assert new.output_logprobs == lp_new.tolist()
    v0 = token_logprobs(trainer_v0, [r.prompt_ids for r in old], [r.output_ids for r in old], temperature=0.9)
    v1 = token_logprobs(trainer_v1, [r.prompt_ids for r in old], [r.output_ids for r in old], temperature=0.9)
    for r, lp0, lp1 in zip(old, v0, v1):
        k = before[(r.request_id, r.sample_index)]
        assert r.output_logprobs[:k] == lp0[:k].tolist()  # bit for bit under the weights that sampled them
        if mode == "recompute":  # recomputed K/V: the new weights' forward over the whole prefix
            assert r.output_logprobs[k:] == lp1[k:].tolist()
        else:  # kept K/V of the old weights in the context: close to the new weights' forward, not equal
            assert r.output_logprobs[k:] != lp1[k:].tolist()
    if mode == "keep":  # the requests that ran across the update registered none of their blocks
        (again,) = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=2))
        assert again.num_cached_prompt_tokens == 0
    assert engine.scheduler.block_manager.num_used_blocks == 0
