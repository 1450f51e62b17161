"""A Ray entry point: one engine inside an actor, for trainers orchestrated by Ray (verl, OpenRLHF style).

    import ray
    from parity.distributed.ray_actor import EngineActor
    Actor = ray.remote(num_gpus=1)(EngineActor)
    actor = Actor.remote("path/to/model", dtype="bf16")
    rollouts = ray.get(actor.generate.remote(prompts, SamplingParams(n=8, temperature=1.0)))
    ray.get(actor.update_weights.remote(trainer_state_dict))

Ray places the actor and sets CUDA_VISIBLE_DEVICES, so the engine's default device (`cuda`) is the
GPU Ray assigned. Ray itself is not imported here: it stays an optional dependency, and the class
works as a plain object too (tests, or trainers that build their own actor wrapper).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

from parity.engine.engine import Engine
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout
from parity.engine.weight_sync import WeightSource


class EngineActor:
    """One Engine, with the calls a remote trainer makes. Every argument and result pickles."""

    def __init__(self, model_path: str | Path, **engine_kwargs):
        self.engine = Engine.from_pretrained(model_path, **engine_kwargs)

    def generate(
        self, prompts: Seq[str] | Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[Rollout]:
        return self.engine.generate(prompts, params)

    def update_weights(self, source: WeightSource, partial: bool = False) -> int:
        """Copy the trainer's tensors (a state dict or (name, tensor) pairs, sent by Ray); return the new weight version."""
        return self.engine.update_weights(source, partial=partial).weight_version

    def sleep(self, level: int = 1) -> int:
        """Release the KV cache and offload (1) or discard (2) the weights; return the bytes freed."""
        return self.engine.sleep(level).freed_bytes

    def wake_up(self, tags: Seq[str] | None = None) -> None:
        self.engine.wake_up(tags)
