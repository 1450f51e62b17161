"""parity: an RL rollout engine whose logprobs agree with the trainer's."""

from parity.config import EngineConfig
from parity.rollout.engine import Engine, PromptTooLongError
from parity.rollout.sampling_params import SamplingParams
from parity.rollout.sequence import Rollout

__all__ = ["Engine", "EngineConfig", "PromptTooLongError", "Rollout", "SamplingParams"]
__version__ = "0.1.0"
