"""parity as a verl rollout backend (verl 0.9.1): `actor_rollout_ref.rollout.name=parity`.

verl finds it through the `verl.plugins` entry point (`parity.integrations.verl_plugin`), which registers
`ServerAdapter` in verl's `_ROLLOUT_REGISTRY` and `ParityReplica` in its `RolloutReplicaRegistry`; nothing
of verl is patched. The three pieces mirror verl's vLLM backend, so verl's trainer, agent loop and partial
rollouts drive them unchanged:

- `ParityServer`, one Ray actor per replica (`parity_server_{replica}_0`), owns an `AsyncEngine` and takes
  verl's token-in-token-out `generate(prompt_ids, sampling_params, request_id) -> TokenOutput` from many
  agent-loop workers at once (max_concurrency >= max_num_seqs + 16), plus the control calls verl makes
  (wake_up, sleep, clear/release/resume_kv_cache, abort_all_requests, abort_request, resume_generation,
  set_global_steps, get_server_address). It also serves parity's OpenAI API on a free port, the address
  verl hands to chat-completion clients.
- `ServerAdapter(BaseRollout)` lives in each trainer worker: verl's weight sync calls resume(["weights"]),
  update_weights(generator of (HF name, tensor), global_steps=...), resume(["kv_cache"]); release() after
  generation. Every rank consumes the generator (FSDP gathers inside it); rank 0 of the replica sends the
  tensors, copied to CPU (floats wider than the engine's dtype cast to it first), through Ray to its server,
  which validates all of them before the first copy. Each of these calls logs one INFO line
  `parity rollout timing: phase=... seconds=...` with the engine's own seconds and sizes beside it.
- `ParityReplica(RolloutReplica).launch_servers()` starts the server on the node of the replica's first
  trainer worker, seeing the same GPU (colocated, verl's "hybrid" mode, is the tested path).

Sampling params arrive as verl's dict (vLLM names): temperature, top_p, top_k (-1 = all), repetition_penalty,
logprobs (bool: return the sampled tokens' logprobs), max_tokens (default: what response_length and
prompt_length leave), ignore_eos, seed; min_p, stop, stop_token_ids, min_tokens, presence/frequency_penalty
keep their vLLM meaning. Anything else is refused by name. `rollout.logprobs_mode` picks the logprob:
"processed_logprobs" (verl's default: under the distribution sampled from) or "raw_logprobs" (log-softmax
of the unprocessed logits). An aborted request returns its tokens and logprobs so far with stop_reason
"aborted", which verl's partial rollout resubmits.

Not supported (refused with a message): tensor/data/pipeline parallel > 1 in one replica, multimodal
inputs, LoRA adapters synced unmerged (use `lora.merge=True`), verl's delta_flush wire format.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import ray
import torch
import uvicorn
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator

from parity.engine.async_engine import AsyncEngine
from parity.engine.engine import Engine
from parity.engine.sampling_params import SamplingParams
from parity.engine.sleep import SleepStats, WakeStats
from parity.engine.weight_sync import WeightSyncStats
from parity.integrations.verl_plugin import ROLLOUT_NAME
from parity.precision.checks import check_int, check_int_list
from parity.precision.dtypes import resolve_dtype
from parity.server.app import create_app

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))  # verl's modules' convention
# The engine's decode-graph capture, which follows every wake and falls in verl's generation time, logs there too.
logging.getLogger("parity.engine.model_runner").setLevel(logger.level)

# verl's dtype names -> EngineConfig.dtype
_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
           "float32": "fp32", "fp32": "fp32", "float": "fp32", "auto": "auto"}
# verl sampling keys that are SamplingParams fields with the same (vLLM) meaning
_PASSED_THROUGH = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "ignore_eos", "stop",
                   "stop_token_ids", "min_tokens", "presence_penalty", "frequency_penalty")
_LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


def server_name(replica_rank: int, name_suffix: str = "", is_reward_model: bool = False) -> str:
    """The Ray actor name of a replica's server, which the trainer workers' ServerAdapter looks up."""
    role = "reward_" if is_reward_model else ""
    return f"{ROLLOUT_NAME}_server_{role}{replica_rank}_0{name_suffix}"


def check_supported(config: RolloutConfig) -> None:
    """Refuse what this backend does not do, naming the setting, before any actor starts."""
    for key in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size"):
        if getattr(config, key) != 1:
            raise NotImplementedError(f"rollout.name=parity runs one GPU per replica: rollout.{key} must be 1, "
                                      f"got {getattr(config, key)}")
    if config.dtype not in _DTYPES:
        raise ValueError(f"rollout.dtype: expected one of {sorted(_DTYPES)}, got {config.dtype!r}")
    if config.logprobs_mode not in _LOGPROBS_MODES:
        raise ValueError(f"rollout.logprobs_mode: expected one of {_LOGPROBS_MODES}, got {config.logprobs_mode!r}")
    if config.quantization is not None:
        raise NotImplementedError(f"rollout.quantization: parity runs unquantized weights, got {config.quantization!r}")


def engine_options(config: RolloutConfig) -> dict[str, Any]:
    """EngineConfig fields from verl's rollout config; `rollout.engine_kwargs.parity` (any EngineConfig field,
    e.g. deterministic=True) is applied last, as verl's vLLM backend applies `engine_kwargs.vllm`."""
    extra = dict((config.engine_kwargs or {}).get(ROLLOUT_NAME) or {})
    return dict(
        dtype=_DTYPES[config.dtype],
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        memory_utilization=config.gpu_memory_utilization,
        enable_prefix_caching=config.enable_prefix_caching,
        enforce_eager=config.enforce_eager,
        seed=config.seed,
    ) | extra


def engine_dtype(config: RolloutConfig) -> torch.dtype | None:
    """The dtype the server's engine holds its weights in, read from the options it is built with (no call
    to the server); None for "auto", which the engine resolves from its device and the checkpoint."""
    dtype = engine_options(config)["dtype"]
    return None if dtype == "auto" else resolve_dtype(dtype)


def sampling_params_from_verl(params: dict[str, Any], config: RolloutConfig, prompt_len: int, max_model_len: int,
                              default_seed: int | None = None) -> tuple[SamplingParams, bool]:
    """(SamplingParams, whether logprobs are returned) from verl's per-request dict, as vLLM's server reads it.

    max_tokens (or SGLang's max_new_tokens) defaults to min(response_length, prompt_length + response_length -
    prompt_len) and is capped by what the context has left; a prompt that leaves no room is refused."""
    params = dict(params)
    room = max_model_len - prompt_len
    if room < 1:
        raise ValueError(f"prompt_ids: {prompt_len} tokens leave no room to generate within max_model_len={max_model_len}")
    given = next((key for key in ("max_tokens", "max_new_tokens") if key in params), None)
    if given is not None:
        max_tokens = check_int(f"sampling_params.{given}", params.pop(given), 1)
    else:
        max_tokens = max(1, min(config.response_length, config.prompt_length + config.response_length - prompt_len))
    want_logprobs = bool(params.pop("logprobs", False))
    unknown = sorted(set(params) - set(_PASSED_THROUGH))
    if unknown:
        raise ValueError(f"sampling_params: parity's verl backend does not know {unknown}; it takes "
                         f"{sorted((*_PASSED_THROUGH, 'max_tokens', 'max_new_tokens', 'logprobs'))}")
    params.setdefault("repetition_penalty", config.repetition_penalty)
    params.setdefault("ignore_eos", config.ignore_eos)
    if default_seed is not None:
        params.setdefault("seed", default_seed)
    sp = SamplingParams(max_tokens=min(max_tokens, room),
                        raw_logprobs=config.logprobs_mode == "raw_logprobs", **params)
    return sp, want_logprobs


class ParityServer:
    """verl's rollout server on parity (the role of verl's `vLLMHttpServer`); `ray.remote` is applied by
    ParityReplica. Requests that arrive while generation is paused (between abort_all_requests and
    resume_generation) wait for the resume; with reject_request they, and those already waiting, come back
    at once as aborted (no tokens), so verl's client sends them to another replica."""

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, rollout_mode: RolloutMode,
                 replica_rank: int, cuda_visible_devices: str | None = None):
        if cuda_visible_devices:  # before anything touches CUDA in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        check_supported(self.config)
        self.rollout_mode = rollout_mode
        self.replica_rank = replica_rank
        self.global_steps: int | None = None
        self.engine: AsyncEngine | None = None
        self._paused = False
        self._rejecting = False
        self._resumed = asyncio.Event()  # binds to the actor's event loop at its first wait
        self._address = ray.util.get_node_ip_address().strip("[]")
        self._port: int | None = None
        self._max_model_len: int | None = None
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task | None = None

    async def launch_server(self) -> None:
        """Load the model (rollout.load_format is ignored: the real weights are read, the trainer's then
        overwrite them at the first sync) and serve parity's OpenAI API beside the Ray methods."""
        engine = Engine.from_pretrained(self.model_config.local_path, **engine_options(self.config))
        self._max_model_len = engine.max_model_len
        self.engine = AsyncEngine(engine)
        app = create_app(self.engine, self.config.prometheus.served_model_name or self.model_config.local_path)
        # uvicorn on this actor's event loop, kept so shutdown() can stop it (and, through the app's
        # lifespan, the engine) instead of leaving a listening socket behind
        self._http = uvicorn.Server(uvicorn.Config(app, host=self._address, port=0, log_level="warning"))
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                await self._http_task  # startup failed: re-raise what uvicorn raised
                raise RuntimeError(f"the parity OpenAI server on {self._address} stopped while starting")
            await asyncio.sleep(0.01)
        self._port = self._http.servers[0].sockets[0].getsockname()[1]

    async def shutdown(self) -> None:
        """Stop the OpenAI server and the engine thread (in-flight requests come back aborted, later ones
        are refused) and let go of the engine's memory. Idempotent."""
        if self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
            self._http = self._http_task = self._port = None
        await asyncio.to_thread(self.__ray_shutdown__)

    def __ray_shutdown__(self) -> None:
        """Ray's hook for an actor that exits gracefully (its handles gone): stop the engine thread."""
        if self.engine is not None:
            self.engine.shutdown()

    def get_server_address(self) -> tuple[str, int]:
        if self._port is None:
            raise RuntimeError("the parity server is not launched yet (launch_server)")
        return self._address, self._port

    # ----------------------------------------------------------------------------------- requests
    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       image_data: list[Any] | None = None, video_data: list[Any] | None = None,
                       audio_data: list[Any] | None = None, mm_processor_kwargs: dict[str, Any] | None = None,
                       priority: int = 0) -> TokenOutput:
        for key, value in (("image_data", image_data), ("video_data", video_data), ("audio_data", audio_data),
                           ("mm_processor_kwargs", mm_processor_kwargs)):
            if value:
                raise NotImplementedError(f"{key}: parity's verl backend serves text-only models")
        prompt_ids = check_int_list("prompt_ids", prompt_ids, 0)
        default_seed = self.replica_rank + self.config.seed if self.config.full_determinism else None
        params, want_logprobs = sampling_params_from_verl(
            sampling_params, self.config, len(prompt_ids), self._max_model_len, default_seed)
        while self._paused:
            if self._rejecting:
                return TokenOutput(token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps})
            await self._resumed.wait()
        # no await between the gate and the submission: an abort_all_requests after this line sees the request
        (rollout,) = await self.engine.generate(prompt_ids, params, request_id=request_id)
        logprobs = rollout.output_raw_logprobs if params.raw_logprobs else rollout.output_logprobs
        return TokenOutput(
            token_ids=list(rollout.output_ids),
            log_probs=list(logprobs) if want_logprobs else None,
            stop_reason="aborted" if rollout.finish_reason == "abort" else "completed",
            num_preempted=rollout.num_preemptions,
            extra_fields={"global_steps": self.global_steps, "weight_versions": list(rollout.output_weight_versions)},
        )

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict[str, Any]:
        """Pause generation and abort what runs (their callers get the partial outputs); resume_generation()
        lets parked and new requests in again."""
        self._paused = True
        self._rejecting = reject_request
        if reject_request:  # requests parked earlier come back aborted too, so their clients re-route them
            parked = self._resumed
            self._resumed = asyncio.Event()
            parked.set()
        else:
            self._resumed.clear()
        rollouts = await self.engine.abort_all()
        if reset_prefix_cache:
            await self.clear_kv_cache()
        request_ids = sorted({r.request_id for r in rollouts})
        return {"aborted_count": len(request_ids), "request_ids": request_ids}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict[str, Any]:
        rollouts = await self.engine.abort(request_id)
        if rollouts and reset_prefix_cache:
            await self.clear_kv_cache()
        return {"aborted": bool(rollouts), "request_id": request_id}

    async def resume_generation(self) -> None:
        self._paused = False
        self._rejecting = False
        self._resumed.set()

    async def set_global_steps(self, global_steps: int) -> None:
        """The trainer step whose weights the engine holds; every TokenOutput carries it."""
        self.global_steps = global_steps

    # ------------------------------------------------------------------------------ weights, memory
    async def update_weights(self, named_tensors: list[tuple[str, WireTensor]], global_steps: int | None = None
                             ) -> dict[str, Any]:
        """Copy the trainer's (HF name, tensor) pairs in, each as `to_wire` sent it; all are validated before the
        first copy. The engine empties its prefix cache and bumps its weight version. Returns the engine's
        WeightSyncStats (`seconds`: validation and copies) and `server_seconds`, this method's wall time, which
        adds the wait for the engine thread: the caller's round trip minus it is Ray's serialisation and transport."""
        start = time.perf_counter()
        stats = await self.engine.update_weights([(name, from_wire(wire)) for name, wire in named_tensors])
        if global_steps is not None:
            self.global_steps = global_steps
        return _stats_summary(stats) | {"server_seconds": time.perf_counter() - start}

    async def wake_up(self, tags: list[str] | None = None) -> dict[str, Any] | None:
        """Hybrid: bring back what `tags` names ("weights", "kv_cache"; default both). Colocated: both.
        Standalone servers never sleep. Returns the engine's WakeStats, None where nothing was asleep."""
        if self.rollout_mode == RolloutMode.STANDALONE:
            return None
        tags = None if self.rollout_mode == RolloutMode.COLOCATED else tags
        return _stats_summary(await self.engine.call(lambda engine: _wake(engine, tags)))

    async def sleep(self) -> dict[str, Any] | None:
        """Free the KV cache and the weights while the trainer trains (rollout.free_cache_engine). Hybrid: the
        weights are discarded (the next sync writes them all); colocated: offloaded to host memory. Returns
        the engine's SleepStats, None where it did not sleep now."""
        if self.rollout_mode == RolloutMode.STANDALONE or not self.config.free_cache_engine:
            return None
        level = 2 if self.rollout_mode == RolloutMode.HYBRID else 1
        return _stats_summary(await self.engine.call(
            lambda engine: engine.sleep(level) if engine.sleep_state is None else None))

    async def clear_kv_cache(self) -> None:
        """Drop the prefix cache (blocks computed under older weights must not be served)."""
        await self.engine.call(lambda engine: engine.scheduler.reset_prefix_cache())

    async def release_kv_cache(self) -> None:
        """Free only the KV cache for a weight sync, keeping the weights (hybrid mode)."""
        if self.rollout_mode != RolloutMode.HYBRID or not self.config.free_cache_engine:
            return

        def release(engine: Engine) -> None:
            if engine.sleep_state is None:
                engine.sleep(1)
                engine.wake_up(["weights"])

        await self.engine.call(release)

    async def resume_kv_cache(self) -> None:
        if self.rollout_mode != RolloutMode.HYBRID or not self.config.free_cache_engine:
            return
        await self.engine.call(lambda engine: _wake(engine, ["kv_cache"]))

    async def kv_cache_usage(self) -> dict[str, int]:
        """Blocks in use and free (for tests and metrics)."""
        return await self.engine.call(lambda engine: engine.kv_cache_usage())

    async def sleep_state(self) -> dict[str, Any] | None:
        """What sleep released and is not back yet; None when awake."""
        state = await self.engine.call(lambda engine: engine.sleep_state)
        return None if state is None else {"level": state.level, "weights": state.weights,
                                           "kv_cache_released": state.kv_cache_released}

    async def start_profile(self, **kwargs) -> None:
        logger.warning("parity's verl backend has no profiler hook; start_profile ignored")

    async def stop_profile(self) -> None:
        pass


def _wake(engine: Engine, tags: list[str] | None) -> WakeStats | None:
    """wake_up that is a no-op (None) for what is already back (verl wakes weights and KV cache in two calls)."""
    return None if engine.sleep_state is None else engine.wake_up(tags)


def _stats_summary(stats: WeightSyncStats | WakeStats | SleepStats | None) -> dict[str, Any] | None:
    """The engine's stats as a small plain dict for the trainer's log: sizes, seconds and flags (the memory
    snapshots left out)."""
    if stats is None:
        return None
    return {key: value for key, value in dataclasses.asdict(stats).items() if not isinstance(value, dict)}


def _node_and_devices() -> tuple[str, str | None]:
    """Run in a trainer worker: its node id and the accelerators Ray gave it (None on CPU)."""
    from verl.utils.device import get_resource_name

    ids = ray.get_runtime_context().get_accelerator_ids().get(get_resource_name()) or []
    return ray.get_runtime_context().get_node_id(), ",".join(str(i) for i in ids) or None


class ParityReplica(RolloutReplica):
    """One parity server per replica, on the node and GPU of the replica's trainer worker."""

    def __init__(self, replica_rank: int, config: RolloutConfig, model_config: HFModelConfig, gpus_per_node: int = 8,
                 is_reward_model: bool = False, is_teacher_model: bool = False, name_suffix: str = ""):
        super().__init__(replica_rank, config, model_config, gpus_per_node, is_reward_model, is_teacher_model,
                         name_suffix)
        check_supported(self.config)
        self.server_class = ray.remote(ParityServer)

    async def launch_servers(self) -> None:
        if len(self.workers) != 1:
            raise RuntimeError(f"a parity replica runs on one worker, got {len(self.workers)}")
        node_id, devices = await self.workers[0].__ray_call__.remote(lambda _self: _node_and_devices())
        env_vars = _platform_env_vars()
        server = self.server_class.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            runtime_env={"env_vars": env_vars},
            name=server_name(self.replica_rank, self.name_suffix, self.is_reward_model),
            max_concurrency=self.max_concurrency,
        ).remote(config=self.config, model_config=self.model_config, rollout_mode=self.rollout_mode,
                 replica_rank=self.replica_rank, cuda_visible_devices=devices)
        await server.launch_server.remote()
        self.servers.append(server)
        self._server_handle = server
        address, port = await server.get_server_address.remote()
        self._server_address = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _platform_env_vars() -> dict[str, str]:
    """What verl's platform sets for rollout servers: Ray must not hide the trainer's GPU from the server
    (it has num_gpus=0 and shares the worker's device)."""
    from verl.plugin.platform import get_platform

    platform = get_platform()
    return {**{var: "1" for var in platform.ray_noset_envvars()}, **platform.rollout_env_vars()}


def _format_field(key: str, value: Any) -> str:
    """`key=value` for a timing line: sizes in MB, seconds to the millisecond, lists comma-joined."""
    if "bytes" in key and isinstance(value, int):
        return f"{key.replace('bytes', 'mb')}={value / 1e6:.1f}"
    if isinstance(value, float):
        return f"{key}={value:.3f}"
    if isinstance(value, (list, tuple)):
        return f"{key}={','.join(map(str, value))}"
    return f"{key}={value}"


def _log_timing(phase: str, **fields: Any) -> None:
    """One INFO line per phase of verl's weight sync and memory calls, so a run's console log shows where
    `timing_s/update_weights` goes; the raw fields ride on the record as `timing` for tests and log readers."""
    shown = " ".join(_format_field(key, value) for key, value in fields.items())
    logger.info("parity rollout timing: phase=%s %s", phase, shown, extra={"timing": {"phase": phase, **fields}})


def _engine_fields(stats: dict[str, Any] | None) -> dict[str, Any]:
    """The server's engine stats as log fields named `engine_<stat>`; `engine=idle` where the engine had
    nothing to do (already awake or asleep, or a standalone server)."""
    if stats is None:
        return {"engine": "idle"}
    return {f"engine_{key}": value for key, value in stats.items()}


async def _timed(submit: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    """What a remote call returns and its wall seconds, from submission (argument serialisation included)."""
    start = time.perf_counter()
    result = await submit()
    return result, time.perf_counter() - start


# A host tensor as its raw bytes (a numpy array), its dtype's name and its shape: Ray pickles numpy arrays out of
# band (one copy into its object store, read back as a view) but a torch tensor in band: SmolLM2-135M's bf16
# weights in one call on a 2-core box, median 0.93 s as torch tensors, 0.07 s as numpy (benchmarks.ray_weight_transfer).
WireTensor = tuple[np.ndarray, str, tuple[int, ...]]


def to_wire(tensor: torch.Tensor) -> WireTensor:
    """A host tensor's bytes, dtype and shape, for the Ray call (any dtype: the bytes are viewed, not converted)."""
    t = tensor.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape)


def from_wire(wire: WireTensor) -> torch.Tensor:
    """`to_wire`'s tensor again, a view of the bytes Ray delivered (read-only: the engine only copies from it)."""
    data, dtype, shape = wire
    with warnings.catch_warnings():  # torch warns that the array is not writable; nothing writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data).view(getattr(torch, dtype)).view(shape)


def host_copy(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A host copy of one trainer tensor for the Ray call (a DTensor gathered first). A float wider than the
    engine's `dtype` is cast on its own device before the copy: half the bytes through Ray for an fp32
    trainer, and exactly the engine's own cast in `WeightMap.copy` (a plain `.to(dtype)`, round to nearest
    even), so what lands is unchanged; the inf/nan check then sees those values, so an fp32 value beyond
    fp16's range is refused as inf instead of landing as inf."""
    if hasattr(tensor, "full_tensor"):  # a DTensor shard
        tensor = tensor.full_tensor()
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point() and tensor.dtype.itemsize > dtype.itemsize:
        tensor = tensor.to(dtype)
    return tensor.to("cpu", copy=True)


class ServerAdapter(BaseRollout):
    """The trainer worker's side of the rollout: sleep/wake and weight sync of its replica's server."""

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh=None, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        check_supported(self.config)
        # one trainer rank per replica (check_supported), so the rank is the replica's
        self.replica_rank = int(os.environ.get("RANK", "0")) if replica_rank == -1 else replica_rank
        self.engine_dtype = engine_dtype(self.config)
        self._server = None

    def _server_handle(self):
        if self._server is None:  # looked up lazily: verl builds the adapter before it launches the servers
            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        if self.config.free_cache_engine:
            stats, seconds = await _timed(lambda: self._server_handle().wake_up.remote(tags=tags))
            _log_timing("resume", tags=tags, seconds=seconds, **_engine_fields(stats))

    async def release(self) -> None:
        if self.config.free_cache_engine:
            stats, seconds = await _timed(lambda: self._server_handle().sleep.remote())
            _log_timing("release", seconds=seconds, **_engine_fields(stats))

    @torch.no_grad()
    async def update_weights(self, weights, global_steps: int | None = None, wire_format: str = "named_tensors",
                             peft_config=None, **kwargs) -> None:
        if wire_format != "named_tensors":
            raise NotImplementedError(f"wire_format: parity takes 'named_tensors', got {wire_format!r}")
        if peft_config is not None:
            raise NotImplementedError("peft_config: parity syncs merged weights; set actor_rollout_ref.model.lora.merge=True")
        pairs, sent_bytes = await self._host_copies(weights)
        wire = [(name, to_wire(t)) for name, t in pairs]
        reply, seconds = await _timed(
            lambda: self._server_handle().update_weights.remote(wire, global_steps=global_steps))
        server_seconds = reply.pop("server_seconds")
        _log_timing("update_weights.ray_call", num_tensors=len(pairs), bytes=sent_bytes, seconds=seconds,
                    server_seconds=server_seconds, **_engine_fields(reply))

    async def _host_copies(self, weights) -> tuple[list[tuple[str, torch.Tensor]], int]:
        """Drain verl's generator into host copies (and their total bytes), logging its phase: `seconds` is
        the whole drain (the trainer's gathers inside the generator included), `to_host_seconds` the casts
        and device-to-host copies, which also wait for GPU work the generator queued."""
        pairs = []
        to_host_seconds = 0.0
        start = time.perf_counter()
        async for name, tensor in ensure_async_iterator(weights):
            copy_start = time.perf_counter()
            pairs.append((name, host_copy(tensor, self.engine_dtype)))
            to_host_seconds += time.perf_counter() - copy_start
        sent_bytes = sum(t.numel() * t.element_size() for _, t in pairs)
        _log_timing("update_weights.host_copy", num_tensors=len(pairs), bytes=sent_bytes,
                    dtypes=sorted({str(t.dtype).removeprefix("torch.") for _, t in pairs}),
                    seconds=time.perf_counter() - start, to_host_seconds=to_host_seconds)
        return pairs, sent_bytes
