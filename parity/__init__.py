"""parity: an RL rollout engine whose logprobs agree with the trainer's."""

from parity.engine.async_engine import AsyncEngine
from parity.engine.config import EngineConfig
from parity.engine.engine import Engine, PromptTooLongError
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "PromptTooLongError", "Rollout", "SamplingParams"]
__version__ = "0.1.0"
