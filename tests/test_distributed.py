"""Distributed rollout on the CPU: 2 processes over gloo, joined through env:// like torchrun does.

Data parallel: the rollouts of 2 ranks equal one process's with the same seeds. Tensor parallel:
TP=2 gives TP=1's greedy tokens and logprobs to fp32 rounding (and HF's to 1e-4), for GQA models
whose KV heads split over the ranks, with a vocabulary that does not divide by 2 and an untied head.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from spawn_ranks import run_ranks
from transformers import AutoModelForCausalLM

from parity import Engine, SamplingParams
from parity.distributed.data_parallel import DataParallelRollout, shard_bounds
from parity.distributed.ray_actor import EngineActor
from parity.distributed.tensor_parallel import TensorParallelDecoder, TPEngine, local_config
from parity.models.config import ModelConfig
from parity.models.weights import WeightError
from parity.precision.policy import PrecisionPolicy
from parity.testing.factory import TinyModelSpec, write_tiny_model

ENGINE_KW = dict(device="cpu", dtype="fp32", kv_cache_memory=1 << 21, max_model_len=128)
PROMPTS = ["What is 12 + 34?", "Sort the list 5 3 9 1", "Hello", "The quick brown fox", "Once upon a time"]


# --------------------------------------------------------------------------------- rollout comparison
def outcome(rollouts) -> list[tuple]:
    """What a rollout is, without the engine-local request id."""
    return [(r.prompt_index, r.sample_index, r.prompt_ids, r.output_ids, r.finish_reason) for r in rollouts]


def assert_same_rollouts(got, want, atol: float = 1e-5) -> None:
    assert outcome(got) == outcome(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g.output_logprobs), torch.tensor(w.output_logprobs), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------ data parallel
DP_PARAMS = [
    SamplingParams(n=3, temperature=1.0, max_tokens=10),
    SamplingParams(n=2, temperature=0.8, top_k=20, max_tokens=8),
    SamplingParams(temperature=0, max_tokens=12),
    SamplingParams(n=2, temperature=1.0, seed=123, max_tokens=9),
    SamplingParams(n=4, temperature=1.2, top_p=0.9, max_tokens=7),
]


def _dp_worker(rank: int, model_dir: str) -> dict:
    dp = DataParallelRollout(Engine.from_pretrained(model_dir, **ENGINE_KW))
    out = {"gathered": dp.generate(PROMPTS, DP_PARAMS), "own": dp.generate(PROMPTS, DP_PARAMS, gather=False)}
    try:  # rank 1 passes other prompts: every rank must refuse rather than mix two batches
        dp.generate(PROMPTS if rank == 0 else PROMPTS[::-1], DP_PARAMS)
    except ValueError as e:
        out["mismatch_error"] = str(e)
    return out


def test_data_parallel_equals_one_process(llama_dir, tmp_path):
    ranks = run_ranks(_dp_worker, 2, tmp_path, llama_dir)

    engine = Engine.from_pretrained(llama_dir, **ENGINE_KW)
    single = DataParallelRollout(engine)  # no process group: one rank doing every prompt
    want = single.generate(PROMPTS, DP_PARAMS)
    want_second_call = single.generate(PROMPTS, DP_PARAMS)
    assert [r.prompt_index for r in want] == [i for i, p in enumerate(DP_PARAMS) for _ in range(p.n)]
    for r in ranks:
        assert_same_rollouts(r["gathered"], want)
        assert "differ between ranks" in r["mismatch_error"]
    # gather=False: each rank holds its contiguous share, whole prompts; together they are the batch.
    bounds = shard_bounds(len(PROMPTS), 2)
    for rank, r in enumerate(ranks):
        assert {x.prompt_index for x in r["own"]} == set(range(bounds[rank], bounds[rank + 1]))
    assert_same_rollouts(ranks[0]["own"] + ranks[1]["own"], want_second_call)
    # The wrapper's seeds are ordinary request seeds: a plain engine given them samples the same.
    seeded = [
        SamplingParams(**{**vars(p), "seed": single.prompt_seed(0, i) if p.seed is None else p.seed})
        for i, p in enumerate(DP_PARAMS)
    ]
    assert_same_rollouts(engine.generate(PROMPTS, seeded), want)
    assert len({tuple(r.output_ids) for r in want if r.prompt_index == 0}) > 1  # samples of a prompt differ


def test_shard_bounds_cover_every_prompt_once():
    for n in range(7):
        for world in (1, 2, 3, 4):
            b = shard_bounds(n, world)
            assert b[0] == 0 and b[-1] == n and all(0 <= b[r + 1] - b[r] <= -(-n // world) for r in range(world))


# ---------------------------------------------------------------------------------- tensor parallel
# TP sums each row-parallel output in another order than TP=1: fp32 rounding of logits of size ~10-30
# reaches ~1e-5 in a logprob; a real sharding error is orders of magnitude larger.
TP_ATOL = 5e-5
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SAMPLED = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True, raw_logprobs=True)


def perturbed_state(model_dir: str) -> dict[str, torch.Tensor]:
    """The checkpoint's full tensors plus fixed noise: what a trainer hands over after an update."""
    state = load_file(str(Path(model_dir) / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def tp_prompts(vocab_size: int) -> list:
    """Text prompts plus one of token ids from both ends of the vocabulary (owned by different ranks)."""
    return PROMPTS[:3] + [[vocab_size - 1, 3, vocab_size - 2, vocab_size // 2, 0]]


def run_tp_checks(engine: Engine, model_dir: str) -> dict:
    """The same calls on a TP=1 Engine and on every rank of a TPEngine."""
    prompts = tp_prompts(engine.model_config.vocab_size)
    out = {"greedy": engine.generate(prompts, GREEDY), "sampled": engine.generate(prompts, SAMPLED)}
    bad = {"model.norm.weight": torch.ones(engine.model_config.hidden_size + 1)}
    try:
        engine.update_weights(bad, partial=True)
    except WeightError as e:
        out["bad_update_error"] = str(e)
    out["greedy_after_bad_update"] = engine.generate(prompts, GREEDY)
    engine.update_weights(perturbed_state(model_dir))
    out["greedy_after_update"] = engine.generate(prompts, GREEDY)
    engine.sleep(level=1)
    engine.wake_up()
    out["greedy_after_wake"] = engine.generate(prompts, GREEDY)
    out["kv_cache_shape"] = tuple(engine.runner.kv_cache.shape)
    return out


def _tp_worker(rank: int, model_dirs: dict[str, str]) -> dict:
    results = {name: run_tp_checks(TPEngine.from_pretrained(path, **ENGINE_KW), path) for name, path in model_dirs.items()}
    try:  # different prompts per rank would make the schedules diverge: refused up front
        TPEngine.from_pretrained(model_dirs["llama"], **ENGINE_KW).generate(PROMPTS[rank], GREEDY)
    except ValueError as e:
        results["mismatch_error"] = str(e)
    return results


def hf_logprobs(model_dir: str, rollouts) -> list[torch.Tensor]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for r in rollouts:
        with torch.no_grad():
            logits = hf(torch.tensor([r.prompt_ids + r.output_ids])).logits[0, len(r.prompt_ids) - 1 : -1]
        out.append(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(r.output_ids)[:, None])[:, 0])
    return out


def test_tensor_parallel_equals_tp1(model_dirs, tmp_path):
    dirs = {
        "llama": model_dirs["llama"],  # GQA 4 heads / 2 KV heads, tied embeddings, llama3 RoPE
        "qwen3": model_dirs["qwen3"],  # per-head q/k norms
        # q/k/v biases, untied LM head, a vocabulary of 383 = 2 * 192 - 1: the last rank has a padding row
        "qwen2_untied": str(
            write_tiny_model(tmp_path / "qwen2u", TinyModelSpec("qwen2", vocab_size=383, tie_word_embeddings=False))
        ),
    }
    ranks = run_ranks(_tp_worker, 2, tmp_path, dirs)
    for name in dirs:  # every rank returns the same rollouts, to the bit
        for case in ("greedy", "sampled", "greedy_after_update"):
            assert_same_rollouts(ranks[1][name][case], ranks[0][name][case], atol=0)
    for name, path in dirs.items():
        got = ranks[0][name]
        want = run_tp_checks(Engine.from_pretrained(path, **ENGINE_KW), path)
        cfg = ModelConfig.from_pretrained(path)
        if name == "qwen2_untied":
            assert cfg.vocab_size == 383 and not cfg.tie_word_embeddings
        for case in ("greedy", "sampled", "greedy_after_bad_update", "greedy_after_update", "greedy_after_wake"):
            assert_same_rollouts(got[case], want[case], atol=TP_ATOL)
        assert outcome(got["greedy_after_update"]) != outcome(got["greedy"])  # the sync really changed weights
        assert "model.norm.weight" in got["bad_update_error"]
        for r, ref in zip(got["greedy"], hf_logprobs(path, got["greedy"])):
            torch.testing.assert_close(torch.tensor(r.output_logprobs), ref, atol=1e-4, rtol=0)
        for r in got["sampled"]:
            assert len(r.output_raw_logprobs) == len(r.output_ids)
        # The cache holds this rank's KV heads only: [2, layers, blocks, block, kv_heads / 2, head_dim].
        assert got["kv_cache_shape"][4] == cfg.num_kv_heads // 2
        assert want["kv_cache_shape"][4] == cfg.num_kv_heads
    assert "differ between ranks" in ranks[0]["mismatch_error"]


def _dp_tp_worker(rank: int, model_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    engine = TPEngine.from_pretrained(model_dir, group=mesh.get_group("tp"), **ENGINE_KW)
    dp = DataParallelRollout(engine, group=mesh.get_group("dp"))
    return {"rollouts": dp.generate(PROMPTS, DP_PARAMS), "tp_rank": engine.model.tp_rank, "dp_rank": dp.rank}


def test_data_parallel_over_tensor_parallel_groups(llama_dir, tmp_path):
    """4 ranks as a (dp=2, tp=2) DeviceMesh: each TP pair takes one DP share; all equal one process."""
    ranks = run_ranks(_dp_tp_worker, 4, tmp_path, llama_dir)
    assert [(r["dp_rank"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    want = DataParallelRollout(Engine.from_pretrained(llama_dir, **ENGINE_KW)).generate(PROMPTS, DP_PARAMS)
    for r in ranks:
        assert_same_rollouts(r["rollouts"], want, atol=TP_ATOL)


def test_tp_size_must_divide_kv_heads(llama_dir):
    cfg = ModelConfig.from_pretrained(llama_dir)  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        local_config(cfg, 4)
    assert local_config(cfg, 2).num_kv_heads == 1


def test_tp_model_needs_a_process_group(llama_dir):
    with pytest.raises(RuntimeError, match="torch.distributed"):
        TensorParallelDecoder(ModelConfig.from_pretrained(llama_dir), PrecisionPolicy("fp32"), "cpu", 64)


# --------------------------------------------------------------------------------------------- ray
def test_engine_actor_class_without_ray(llama_dir):
    """The plain class behind `ray.remote(EngineActor)`: what a Ray trainer calls, run in-process."""
    actor = EngineActor(llama_dir, **ENGINE_KW)
    engine = Engine.from_pretrained(llama_dir, **ENGINE_KW)
    assert_same_rollouts(actor.generate(PROMPTS, GREEDY), engine.generate(PROMPTS, GREEDY))
    state = perturbed_state(llama_dir)
    assert actor.update_weights(state) == 1
    engine.update_weights(state)
    assert_same_rollouts(actor.generate(PROMPTS, GREEDY), engine.generate(PROMPTS, GREEDY))
    assert actor.sleep() > 0
    actor.wake_up()
    assert_same_rollouts(actor.generate(PROMPTS, GREEDY), engine.generate(PROMPTS, GREEDY))
