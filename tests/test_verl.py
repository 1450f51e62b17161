"""parity as verl's rollout backend, driven through verl's own classes on a local Ray cluster (CPU, tiny model).

verl finds the backend through the installed `verl.plugins` entry point; a `RolloutReplica` from verl's
registry launches the server from a real verl `RayWorkerGroup`; a trainer worker builds its rollout with
verl's `get_rollout_class` and syncs weights in the order verl's hybrid engine does. References: parity's
offline `Engine` (same options) for token ids, an HF transformers forward in float64 for the logprobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

verl = pytest.importorskip("verl")
ray = pytest.importorskip("ray")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from verl.single_controller.base import Worker  # noqa: E402
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup  # noqa: E402
from verl.workers.config import HFModelConfig, RolloutConfig  # noqa: E402
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, get_rollout_class  # noqa: E402
from verl.workers.rollout.replica import RolloutReplicaRegistry, TokenOutput  # noqa: E402

from parity import Engine, SamplingParams  # noqa: E402
from parity.integrations.verl import (  # noqa: E402
    ParityReplica,
    ServerAdapter,
    engine_dtype,
    from_wire,
    host_copy,
    sampling_params_from_verl,
    to_wire,
)
from parity.testing.factory import write_tiny_model  # noqa: E402

ENGINE = dict(dtype="fp32", device="cpu", deterministic=True, block_size=4)
MAX_NUM_SEQS = 4
PROMPTS = [[5, 17, 42, 9], [7, 7, 101], [33, 2, 250, 61, 12], [88], [19, 4, 4, 200, 3, 150], [64, 65]]


def rollout_config(**overrides) -> RolloutConfig:
    options = dict(name="parity", tensor_model_parallel_size=1, dtype="float32", prompt_length=16, response_length=24,
                   max_model_len=1024, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=256, free_cache_engine=True,
                   calculate_log_probs=True, engine_kwargs={"parity": {"deterministic": True, "block_size": 4}})
    return RolloutConfig(**(options | overrides))


class TrainerWorker(Worker):
    """The rollout side of verl's fused actor-rollout worker: builds its rollout through verl's registry and
    syncs the trainer model's weights as `engine_workers.ActorRolloutRefWorker.update_weights` does."""

    def __init__(self, rollout_config: RolloutConfig, model_path: str):
        super().__init__()
        self.rollout = get_rollout_class(rollout_config.name, rollout_config.mode)(
            config=rollout_config, model_config=HFModelConfig(path=model_path), device_mesh=None)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    def rollout_class(self) -> str:
        return type(self.rollout).__qualname__

    async def release(self) -> None:
        await self.rollout.release()

    async def train_step_and_sync(self, scale: float, global_steps: int) -> None:
        """A stand-in optimizer step (every weight times `scale`), then verl's sync order."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.mul_(scale)
        await self.rollout.resume(tags=["weights"])
        weights = ((name, tensor) for name, tensor in self.model.state_dict().items())
        await self.rollout.update_weights(weights, peft_config=None, base_sync_done=True, global_steps=global_steps)
        await self.rollout.resume(tags=["kv_cache"])

    def save(self, path: str) -> None:
        self.model.save_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("verl_tiny"))


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """A local Ray cluster, one trainer worker (verl's RayWorkerGroup on a CPU pool) and its parity replica."""
    tests_dir = str(Path(__file__).parent)  # Ray's workers import TrainerWorker from this module
    pythonpath = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="parity-verl-test",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": pythonpath}})
    config = rollout_config()
    pool = RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1)
    workers = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=RayClassWithInitArgs(
        cls=ray.remote(TrainerWorker), rollout_config=config, model_path=str(model_dir)), use_gpu=False,
        device_name="cpu")
    replica = RolloutReplicaRegistry.get("parity")(replica_rank=0, config=config,
                                                   model_config=HFModelConfig(path=str(model_dir)), gpus_per_node=1)
    asyncio.run(replica.init_hybrid(workers))
    yield replica, workers.workers[0]
    ray.shutdown()


@pytest.fixture(scope="module")
def offline(model_dir):
    return Engine.from_pretrained(model_dir, **ENGINE)


def generate(server, prompt, request_id, **params) -> TokenOutput:
    sampling = dict(temperature=0, top_p=1.0, top_k=-1, repetition_penalty=1.0, logprobs=True) | params
    return ray.get(server.generate.remote(prompt_ids=prompt, sampling_params=sampling, request_id=request_id), timeout=60)


def hf_logprobs(model_path: str, prompt: list[int], output: list[int]) -> list[float]:
    """float64 log-softmax of the HF model's logits at each output token (temperature 1: greedy)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(output)[:, None])[:, 0].tolist()


def test_entry_point_registers_the_backend():
    from importlib.metadata import entry_points

    assert "parity" in {ep.name for ep in entry_points(group="verl.plugins")}
    assert _ROLLOUT_REGISTRY[("parity", "async")] == "parity.integrations.verl.ServerAdapter"
    assert get_rollout_class("parity", "async") is ServerAdapter
    assert RolloutReplicaRegistry.get("parity") is ParityReplica


def test_sampling_params_map_from_verls_dict():
    config = rollout_config(repetition_penalty=1.1, ignore_eos=True)
    sp, want = sampling_params_from_verl(dict(temperature=0.7, top_p=0.9, top_k=-1, logprobs=True, seed=3), config,
                                         prompt_len=10, max_model_len=256)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.seed, want) == (0.7, 0.9, -1, 3, True)
    assert (sp.repetition_penalty, sp.ignore_eos) == (1.1, True)  # the config's defaults
    assert sp.max_tokens == min(config.response_length, config.prompt_length + config.response_length - 10)
    sp, want = sampling_params_from_verl(dict(max_tokens=500, logprobs=False), config, prompt_len=250, max_model_len=256)
    assert (sp.max_tokens, want) == (6, False)  # capped by what the context leaves
    with pytest.raises(ValueError, match="best_of"):
        sampling_params_from_verl(dict(best_of=2), config, prompt_len=4, max_model_len=256)
    for bad in (0, -3, 1.5, True, "12"):  # refused by name, never rounded or raised to 1
        with pytest.raises(ValueError, match="sampling_params.max_tokens"):
            sampling_params_from_verl(dict(max_tokens=bad), config, prompt_len=4, max_model_len=256)
    with pytest.raises(ValueError, match="sampling_params.max_new_tokens"):
        sampling_params_from_verl(dict(max_new_tokens=0), config, prompt_len=4, max_model_len=256)
    with pytest.raises(ValueError, match="max_model_len=256"):
        sampling_params_from_verl({}, config, prompt_len=256, max_model_len=256)
    with pytest.raises(NotImplementedError, match="tensor_model_parallel_size"):
        ParityReplica(0, rollout_config(tensor_model_parallel_size=2), None, gpus_per_node=2)


def test_replica_launches_server_beside_the_trainer_worker(cluster):
    import httpx

    replica, worker = cluster
    assert ray.get(worker.rollout_class.remote()) == "ServerAdapter"
    assert replica.server_handle is replica.servers[0]
    models = httpx.get(f"http://{replica.server_address}/v1/models", timeout=30).json()
    assert models["data"], models


def test_concurrent_generate_equals_offline_and_hf_logprobs(cluster, offline, model_dir):
    """More callers than max_num_seqs at once, as verl's agent loop workers send them."""
    server = cluster[0].server_handle
    prompts = PROMPTS * 2  # 12 requests > max_num_seqs
    refs = [server.generate.remote(prompt_ids=p, sampling_params=dict(temperature=0, top_k=-1, top_p=1.0, logprobs=True,
                                                                     max_tokens=12, ignore_eos=True), request_id=f"c{i}")
            for i, p in enumerate(prompts)]
    outputs = ray.get(refs, timeout=120)
    expected = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for out, ref in zip(outputs, expected):
        assert out.stop_reason == "completed"
        assert out.token_ids == ref.output_ids
        assert out.log_probs == ref.output_logprobs
        assert out.extra_fields["global_steps"] is None  # no sync yet
    torch.testing.assert_close(outputs[0].log_probs, hf_logprobs(str(model_dir), prompts[0], outputs[0].token_ids),
                               rtol=0, atol=1e-4)


def test_a_bad_prompt_fails_alone_and_the_server_serves_the_next(cluster, offline):
    server = cluster[0].server_handle
    for bad, field in (([3, 1.5, 4], r"prompt_ids\[1\]"), ([3, -1], r"prompt_ids\[1\]"), ("3 4", "prompt_ids")):
        with pytest.raises(ray.exceptions.RayTaskError, match=field):
            ray.get(server.generate.remote(prompt_ids=bad, sampling_params=dict(max_tokens=2), request_id="bad"),
                    timeout=60)
    out = ray.get(server.generate.remote(prompt_ids=PROMPTS[0], request_id="good",
                                         sampling_params=dict(temperature=0, max_tokens=5, ignore_eos=True)), timeout=60)
    assert out.token_ids == offline.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5,
                                                                          ignore_eos=True))[0].output_ids


def test_abort_returns_partial_output_that_continues_like_verls_partial_rollout(cluster, offline):
    server = cluster[0].server_handle
    prompt, max_tokens = PROMPTS[2], 1000
    full = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0]
    ref = server.generate.remote(prompt_ids=prompt, request_id="long",
                                 sampling_params=dict(temperature=0, logprobs=True, max_tokens=max_tokens, ignore_eos=True))
    deadline = time.monotonic() + 30
    while ray.get(server.kv_cache_usage.remote())["used_blocks"] <= 4 and time.monotonic() < deadline:
        time.sleep(0.02)  # until it has decoded past its prompt's blocks
    result = ray.get(server.abort_all_requests.remote())
    assert result["request_ids"] == ["long"]
    partial = ray.get(ref, timeout=60)
    n = len(partial.token_ids)
    assert partial.stop_reason == "aborted" and 0 < n < max_tokens
    assert partial.token_ids == full.output_ids[:n] and partial.log_probs == full.output_logprobs[:n]

    # paused: a new request waits for resume_generation; with reject_request it comes back aborted at once
    parked = server.generate.remote(prompt_ids=PROMPTS[0], request_id="parked",
                                    sampling_params=dict(temperature=0, max_tokens=4, ignore_eos=True))
    assert not ray.wait([parked], timeout=1.0)[0]
    ray.get(server.abort_all_requests.remote(reject_request=True))
    assert ray.get(parked, timeout=10).stop_reason == "aborted"  # parked behind a gate that now rejects
    rejected = generate(server, PROMPTS[1], "rejected", max_tokens=4)
    assert (rejected.token_ids, rejected.stop_reason) == ([], "aborted")
    ray.get(server.resume_generation.remote())

    # verl resubmits prompt + partial tokens for the rest: greedy, it finishes the same sample
    rest = generate(server, prompt + partial.token_ids, "long-2", max_tokens=max_tokens - n, ignore_eos=True)
    assert rest.stop_reason == "completed"
    assert partial.token_ids + rest.token_ids == full.output_ids
    torch.testing.assert_close(partial.log_probs + rest.log_probs, full.output_logprobs, rtol=0, atol=1e-5)
    assert ray.get(server.abort_request.remote("long-2")) == {"aborted": False, "request_id": "long-2"}


def test_release_then_sync_as_verl_calls_it(cluster, model_dir, tmp_path):
    """release() frees the KV cache and the weights; resume(weights) -> update_weights -> resume(kv_cache) brings
    the trainer's new weights in, and outputs carry the synced global step."""
    replica, worker = cluster
    server = replica.server_handle
    ray.get(worker.release.remote())
    state = ray.get(server.sleep_state.remote())
    assert state == {"level": 2, "weights": "discarded", "kv_cache_released": True}
    ray.get(worker.train_step_and_sync.remote(0.5, 7))
    assert ray.get(server.sleep_state.remote()) is None
    ray.get(worker.save.remote(str(tmp_path)))
    reference = Engine.from_pretrained(model_dir, **ENGINE)
    reference.update_weights(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))
    expected = reference.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    out = generate(server, PROMPTS[4], "after-sync", max_tokens=10, ignore_eos=True)
    assert out.token_ids == expected.output_ids and out.log_probs == expected.output_logprobs
    assert out.extra_fields["global_steps"] == 7 and set(out.extra_fields["weight_versions"]) == {1}

    # the replica's own sleep / wake_up (verl's agent-loop manager calls these around training)
    asyncio.run(replica.sleep())
    assert ray.get(server.sleep_state.remote())["weights"] == "discarded"
    ray.get(worker.train_step_and_sync.remote(1.0, 8))  # the same weights again
    asyncio.run(replica.wake_up())
    assert generate(server, PROMPTS[4], "after-wake", max_tokens=10, ignore_eos=True).token_ids == expected.output_ids


def test_sync_logs_each_phase_with_the_engines_side(cluster, model_dir, offline, caplog):
    """verl's sync order from an adapter in this process: release, resume, update_weights and resume each log
    one timing line with what was sent, the Ray call's seconds and the engine's own seconds and sizes."""
    server = cluster[0].server_handle
    adapter = ServerAdapter(config=rollout_config(), model_config=HFModelConfig(path=str(model_dir)), replica_rank=0)
    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()  # the checkpoint's

    async def release_and_sync() -> None:
        await adapter.release()
        await adapter.resume(tags=["weights"])
        await adapter.update_weights(iter(state.items()), global_steps=11)
        await adapter.resume(tags=["kv_cache"])

    with caplog.at_level(logging.INFO, logger="parity.integrations.verl"):
        asyncio.run(release_and_sync())
    records = [r for r in caplog.records if hasattr(r, "timing")]
    timings = [r.timing for r in records]
    assert [t["phase"] for t in timings] == ["release", "resume", "update_weights.host_copy",
                                             "update_weights.ray_call", "resume"]
    release, wake_weights, host, call, wake_kv = timings
    param_bytes = sum(p.numel() * p.element_size() for p in offline.model.parameters())
    assert release["engine_level"] == 2 and release["engine_weight_bytes"] == param_bytes
    assert release["engine_kv_cache_bytes"] > 0
    assert (wake_weights["tags"], list(wake_weights["engine_tags"])) == (["weights"], ["weights"])
    assert wake_weights["engine_restored_bytes"] == param_bytes
    assert list(wake_kv["engine_tags"]) == ["kv_cache"] and wake_kv["engine_restored_bytes"] > 0
    sent_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert host["num_tensors"] == call["num_tensors"] == len(state)
    assert host["bytes"] == call["bytes"] == sent_bytes and host["dtypes"] == ["float32"]  # an fp32 engine: no cast
    assert call["engine_num_tensors"] == len(offline.weights.targets) and call["engine_bytes_copied"] == param_bytes
    assert host["seconds"] >= host["to_host_seconds"] >= 0
    assert call["seconds"] >= call["server_seconds"] >= call["engine_seconds"] >= 0
    for t in (release, wake_weights, wake_kv):
        assert t["seconds"] >= t["engine_seconds"] >= 0
    assert all(r.levelno == logging.INFO and r.getMessage().startswith(f"parity rollout timing: phase={t['phase']} ")
               for r, t in zip(records, timings))
    assert f"num_tensors={len(state)} mb={sent_bytes / 1e6:.1f} dtypes=float32 seconds=" in records[2].getMessage()

    # the checkpoint's weights landed, under the synced step
    expected = offline.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    out = generate(server, PROMPTS[4], "after-logged-sync", max_tokens=10, ignore_eos=True)
    assert out.token_ids == expected.output_ids and out.extra_fields["global_steps"] == 11


def test_host_copy_casts_wider_floats_as_the_engine_would(model_dir):
    """The adapter sends floats in the engine's dtype when the rollout config names it; what lands is what the
    engine's own cast of the wider tensors gives, bit for bit."""
    assert engine_dtype(rollout_config()) == torch.float32
    assert engine_dtype(rollout_config(dtype="bfloat16")) == torch.bfloat16
    assert engine_dtype(rollout_config(dtype="bfloat16", engine_kwargs={"parity": {"dtype": "fp16"}})) == torch.float16
    assert engine_dtype(rollout_config(dtype="auto")) is None  # resolved by the engine from its device
    engine = Engine.from_pretrained(model_dir, **(ENGINE | {"dtype": "bf16"}))
    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    sent = {name: host_copy(t, torch.bfloat16) for name, t in state.items()}
    assert {t.dtype for t in sent.values()} == {torch.bfloat16}
    engine.update_weights(state)
    cast_by_engine = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.update_weights(sent)
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, cast_by_engine[k]), k

    weight = state["model.norm.weight"]
    assert host_copy(weight, None).dtype == torch.float32  # engine dtype unknown: sent as it is
    assert host_copy(weight.to(torch.bfloat16), torch.float32).dtype == torch.bfloat16  # never widened
    assert host_copy(torch.arange(3), torch.bfloat16).dtype == torch.int64  # not a float: the engine refuses it
    assert host_copy(weight, torch.float32).data_ptr() != weight.data_ptr()  # a copy, not the live tensor


def test_wire_format_round_trips_every_dtype_bit_for_bit_through_ray(cluster):
    """Weights cross Ray as numpy views of their bytes (Ray pickles numpy out of band, torch tensors in band):
    what the server rebuilds is the sent tensor, bits, dtype and shape, for floats with no numpy twin (bf16) too."""
    g = torch.Generator().manual_seed(0)
    sent = {
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(3, generator=g).half(),
        "fp32_view": torch.randn(4, 6, generator=g)[:, 1:4],  # not contiguous
        "int64": torch.arange(6).view(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "nan": torch.tensor([float("nan"), float("inf")]),
    }
    echo = ray.remote(lambda wires: {name: from_wire(w) for name, w in wires.items()})
    back = ray.get(echo.remote({name: to_wire(t) for name, t in sent.items()}))
    for name, t in sent.items():
        got = back[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), name


@pytest.mark.gpu
def test_host_copy_casts_on_the_gpu_with_the_engines_rounding():
    """The adapter casts on the trainer's GPU, the engine casts a host tensor as `WeightMap.copy` does: every
    non-nan fp32 bit pattern (ties, subnormals, values beyond the target's range) rounds to the same bits."""
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 22,), dtype=torch.int32)
    values = bits.view(torch.float32)
    values = values[~values.isnan()]
    for dtype in (torch.bfloat16, torch.float16):
        by_adapter = host_copy(values.cuda(), dtype)
        by_engine = values.to(device="cuda", dtype=dtype).cpu()
        assert torch.equal(by_adapter.view(torch.int16), by_engine.view(torch.int16)), dtype
        assert torch.equal(by_adapter.view(torch.int16), values.to(dtype).view(torch.int16)), dtype


@pytest.fixture(scope="module")
def recipe():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("verl_grpo_arith", Path(__file__).parents[1] / "examples/verl_grpo_arith.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_recipe_writes_verls_parquet_and_scores_locally(recipe, tmp_path):
    import pandas as pd

    train, val = recipe.write_data(tmp_path, num_train=8, num_val=4, max_operand=20, seed=0)
    rows = pd.read_parquet(train)
    assert len(rows) == 8 and len(pd.read_parquet(val)) == 4
    row = rows.iloc[0]
    assert row["data_source"] == recipe.DATA_SOURCE and row["prompt"][0]["role"] == "user"
    a, b = map(int, row["extra_info"]["question"].removeprefix("What is ").split("?")[0].split(" + "))
    assert row["reward_model"]["ground_truth"] == str(a + b)
    # loaded as verl's reward workers load it: by the path and name the recipe's overrides give
    from verl.utils.import_utils import load_extern_object

    given = dict(o.split("=", 1) for o in recipe.overrides(recipe_args(tmp_path, "parity"), tmp_path, train, val))
    compute_score = load_extern_object(module_path=given["reward.custom_reward_function.path"],
                                       object_name=given["reward.custom_reward_function.name"])
    assert compute_score(recipe.DATA_SOURCE, f"{a} + {b} = {a + b}", str(a + b)) == 1.0
    assert compute_score(recipe.DATA_SOURCE, f"{a + b + 1}", str(a + b)) == 0.0


def recipe_args(tmp_path: Path, rollout: str):
    import argparse

    return argparse.Namespace(out=tmp_path, rollout=rollout, steps=3, batch_size=8, group_size=4, max_tokens=32,
                              gpu_memory_utilization=0.3)


def test_recipe_config_composes_and_validates_with_verls_classes(recipe, model_dir, tmp_path):
    """The recipe's overrides through verl's own Hydra config, validate_config and RolloutConfig: parity's
    rollout, SDPA attention in the trainer's HF config, and the vLLM variant differing only in the name."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    train, val = recipe.write_data(tmp_path, num_train=8, num_val=4, max_operand=20, seed=0)
    config, rollout = recipe.compose(recipe.overrides(recipe_args(tmp_path, "parity"), model_dir, train, val))
    assert isinstance(rollout, RolloutConfig) and (rollout.name, rollout.mode) == ("parity", "async")
    assert rollout.max_model_len == 128 + 32 and rollout.calculate_log_probs and rollout.n == 4
    assert config.actor_rollout_ref.hybrid_engine and config.algorithm.adv_estimator == "grpo"
    model = omega_conf_to_dataclass(config.actor_rollout_ref.model, dataclass_type=HFModelConfig)
    assert model.hf_config._attn_implementation == "sdpa"
    assert get_rollout_class(rollout.name, rollout.mode) is ServerAdapter
    vllm_config, _ = recipe.compose(recipe.overrides(recipe_args(tmp_path, "vllm"), model_dir, train, val))
    ours, theirs = (OmegaConf.to_container(c) for c in (config, vllm_config))  # interpolations unresolved
    assert theirs["actor_rollout_ref"]["rollout"].pop("name") == "vllm"
    ours["actor_rollout_ref"]["rollout"].pop("name")
    for c in (ours, theirs):
        del c["trainer"]["experiment_name"], c["ray_kwargs"]["ray_init"]["runtime_env"]["env_vars"]
    assert ours == theirs
    bad = recipe.overrides(recipe_args(tmp_path, "parity"), model_dir, train, val) + [
        "actor_rollout_ref.rollout.logprobs_mode=raw_logits"]
    with pytest.raises(ValueError, match="rollout.logprobs_mode"):
        recipe.compose(bad)


def test_recipe_summary_reads_verls_file_logger(recipe, tmp_path, monkeypatch):
    """Per-step reward and timings as verl's FileLogger wrote them; means over the steps after the first."""
    from verl.utils.tracking import FileLogger

    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "run.jsonl"))
    logged = [{"critic/score/mean": 0.1 * i, "timing_s/gen": 2.0 + i, "timing_s/update_actor": 1.0 / (i + 1),
               "actor/lr": 1e-5, "perf/mfu/actor": 0.01} for i in range(4)]
    logger = FileLogger("p", "e")
    for step, data in enumerate(logged, start=1):
        logger.log(data, step)
    logger.finish()
    summary = recipe.summarize(tmp_path / "run.jsonl", "parity")
    assert summary["num_steps"] == 4 and [s["step"] for s in summary["steps"]] == [1, 2, 3, 4]
    assert summary["steps"][2] == {"step": 3, **{k: v for k, v in logged[2].items() if k.split("/")[0] in ("critic", "timing_s")}}
    later = logged[1:]
    for key in ("critic/score/mean", "timing_s/gen", "timing_s/update_actor"):
        assert summary["mean_after_first_step"][key] == pytest.approx(sum(d[key] for d in later) / len(later), rel=1e-12)
    assert set(summary["mean_after_first_step"]) == {"critic/score/mean", "timing_s/gen", "timing_s/update_actor"}


def test_server_shutdown_stops_its_engine_thread_and_http_port(cluster, model_dir):
    """A second server actor (the module's replica keeps serving): shutdown() leaves no engine thread in the
    actor, closes the OpenAI port and refuses later requests by name."""
    import socket

    from verl.workers.rollout.replica import RolloutMode

    from parity.integrations.verl import ParityServer

    server = ray.remote(ParityServer).options(max_concurrency=8).remote(
        config=rollout_config(), model_config=HFModelConfig(path=str(model_dir)), rollout_mode=RolloutMode.HYBRID,
        replica_rank=1)
    ray.get(server.launch_server.remote(), timeout=120)
    address, port = ray.get(server.get_server_address.remote())

    def engine_threads(actor) -> list[str]:
        import threading

        return ray.get(actor.__ray_call__.remote(
            lambda _self: [t.name for t in threading.enumerate() if t.name == "parity-engine-loop"]))

    assert engine_threads(server) == ["parity-engine-loop"]
    assert generate(server, PROMPTS[0], "before", max_tokens=3, ignore_eos=True).stop_reason == "completed"
    ray.get(server.shutdown.remote(), timeout=60)
    assert engine_threads(server) == []
    with pytest.raises(ConnectionRefusedError), socket.create_connection((address, port), timeout=5):
        pass
    with pytest.raises(ray.exceptions.RayTaskError, match="shut down"):
        generate(server, PROMPTS[0], "after", max_tokens=3)
    ray.get(server.shutdown.remote(), timeout=10)  # idempotent
    ray.kill(server)


# a stand-in trainer: `steps` records framed as verl's FileLogger writes them (unbuffered, one JSON line each;
# test_recipe_summary_reads_verls_file_logger reads the real logger's), a half-written record, then it waits
FAKE_TRAINER = """
import json, os, sys, time
steps, linger = int(sys.argv[1]), float(sys.argv[2])
fp = open(os.environ["VERL_FILE_LOGGER_PATH"], "wb", buffering=0)
for step in range(1, steps + 1):
    fp.write(json.dumps({"step": step, "data": {"critic/score/mean": 0.25 * step, "timing_s/gen": 1.0 + step}}).encode() + b"\\n")
    time.sleep(0.3)
fp.write(b'{"step": 99, "da')
time.sleep(linger)
"""


def test_recipe_summary_follows_the_jsonl_while_verl_runs_and_keeps_it_when_cut(recipe, tmp_path, monkeypatch):
    """The summary is on disk after each step (a half-written last record skipped) before the trainer
    exits; SIGTERM to the recipe (as `timeout` sends it) stops the trainer and leaves the steps done."""
    import json
    import signal
    import subprocess
    import sys

    jsonl, metrics = tmp_path / "run.jsonl", tmp_path / "run.json"
    env = os.environ | {"VERL_FILE_LOGGER_PATH": str(jsonl)}
    summary = recipe.SummaryFile(jsonl, metrics, "parity", ["a=1"])
    seen_running = []
    update = summary.update

    def spy(exit_code=None):  # what a reader of the file sees while the trainer is still running
        written = update(exit_code)
        if written is not None and exit_code is None:
            seen_running.append(json.loads(metrics.read_text())["num_steps"])
        return written

    monkeypatch.setattr(summary, "update", spy)
    code = recipe.run_trainer([sys.executable, "-c", FAKE_TRAINER, "3", "1.0"], env, summary, poll_s=0.1)
    final = json.loads(metrics.read_text())
    assert code == 0 and final["exit_code"] == 0 and final["num_steps"] == 3 and final["overrides"] == ["a=1"]
    assert seen_running and seen_running == sorted(seen_running) and seen_running[-1] == 3
    assert [s["critic/score/mean"] for s in final["steps"]] == [0.25, 0.5, 0.75]
    assert final["mean_after_first_step"]["timing_s/gen"] == pytest.approx((3.0 + 4.0) / 2)
    assert 0.9 <= final["seconds_after_last_step"] < final["seconds"]

    # cut: the recipe's own process gets SIGTERM while the trainer lingers after its steps
    driver = tmp_path / "driver.py"  # the recipe's run_trainer in a process of its own, to be sent SIGTERM
    driver.write_text(
        "import importlib.util, os, sys\nfrom pathlib import Path\n"
        "spec = importlib.util.spec_from_file_location('recipe', sys.argv[1])\n"
        "recipe = sys.modules['recipe'] = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(recipe)\n"
        "summary = recipe.SummaryFile(Path(sys.argv[2]), Path(sys.argv[3]), 'parity', [])\n"
        "sys.exit(recipe.run_trainer([sys.executable, '-c', sys.argv[4], '2', '600'], dict(os.environ), summary, 0.1))\n")
    jsonl.unlink()
    metrics.unlink()
    proc = subprocess.Popen([sys.executable, str(driver), recipe.__file__, str(jsonl), str(metrics), FAKE_TRAINER],
                            env=env)
    deadline = time.monotonic() + 60
    while not (metrics.exists() and json.loads(metrics.read_text())["num_steps"] == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(metrics.read_text())["exit_code"] is None  # still running, steps already on disk
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    cut = json.loads(metrics.read_text())
    assert cut["exit_code"] == 128 + signal.SIGTERM and cut["num_steps"] == 2
