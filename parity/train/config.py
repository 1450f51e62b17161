"""`parity train`'s configuration: typed dataclasses, loaded from YAML with `key.sub=value` overrides.

Sections reuse the dataclasses that own each knob: `engine` is an `EngineConfig`, `model.factory` a
`TinyModelSpec`, `tracking` a `TrackingConfig`, `task` a `TaskConfig`. Unknown keys are an error
naming the full key path, so a typo never falls back to a default silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from parity.engine.config import EngineConfig
from parity.precision.dtypes import dtype_name, resolve_dtype
from parity.precision.importance_sampling import ISConfig
from parity.testing.factory import TinyModelSpec
from parity.train.tasks import TaskConfig
from parity.train.tracking import TrackingConfig
from parity.trainer.losses import AGG_MODES

MIXED_PRECISION = ("fp32", "bf16", "fp16")


@dataclass
class ModelSource:
    """path: the model to train: an HF directory, a .gguf file or a model alias (`smollm2-135m-instruct`;
    a GGUF is dequantized once into an HF directory under $PARITY_CACHE, see gguf.cached_hf_dir);
    None = write a factory model with `factory`'s shapes."""

    path: str | None = None
    factory: TinyModelSpec = field(
        default_factory=lambda: TinyModelSpec(hidden_size=128, intermediate_size=256, initializer_range=0.02)
    )


@dataclass
class WarmStartConfig:
    """Supervised steps before RL, so that some rollouts earn reward. The teacher is right with
    probability `accuracy` (else it gives another problem's answer): see tasks.warmstart_examples."""

    steps: int = 15
    accuracy: float = 1.0
    batch_size: int = 32
    lr: float = 3e-3


@dataclass
class EvalConfig:
    """Greedy accuracy on the whole held-out split (needs task.holdout_fraction > 0), each problem once:
    before the warm-start, after it, every `every` GRPO steps (0 = only then and after the last step)."""

    enabled: bool = False
    every: int = 0
    max_tokens: int | None = None  # default: rollout.max_tokens

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")


@dataclass
class RolloutConfig:
    prompts_per_step: int = 32
    group_size: int = 8  # samples per prompt (GRPO's group)
    max_tokens: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str = "fp32"  # trainer compute: fp32, or accelerate autocast bf16 / fp16 (with loss scaling)

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")


@dataclass
class LossConfig:
    """The clipped policy loss (`losses.policy_loss`) and its rollout IS correction (`importance_sampling`)."""

    clip_low: float = 0.2  # PPO ratio clip: [1 - clip_low, 1 + clip_high]; DAPO's clip-higher: 0.28
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    normalize_std: bool = True  # GRPO divides advantages by the group std; Dr. GRPO does not
    num_minibatches: int = 4  # optimizer steps per rollout batch
    importance_sampling: ISConfig = field(default_factory=ISConfig)  # token TIS, C = 2, by default

    def __post_init__(self) -> None:
        if self.agg not in AGG_MODES:
            raise ValueError(f"loss.agg must be one of {', '.join(AGG_MODES)}, got {self.agg!r}")
        if self.num_minibatches < 1:
            raise ValueError(f"loss.num_minibatches must be >= 1, got {self.num_minibatches}")


TRAINER_MODELS = ("hf", "parity")


@dataclass
class TrainerConfig:
    """model: what the trainer trains. `hf`: the HF transformers model (float32 weights, `optim.mixed_precision`
    autocast), scored against the engine's logprobs with the mismatch metrics and IS correction. `parity`:
    parity's own decoder (`ParityForCausalLM`) in the engine's dtype and policy, with float32 master weights in
    the optimizer; with the engine in deterministic mode the trainer's logprobs are the rollout's bit for bit
    (mismatch exactly 0), so `loss.importance_sampling.method: none` is exact on-policy RL."""

    model: str = "hf"

    def __post_init__(self) -> None:
        if self.model not in TRAINER_MODELS:
            raise ValueError(f"trainer.model must be one of {', '.join(TRAINER_MODELS)}, got {self.model!r}")


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 40
    out_dir: str = "runs/grpo"
    device: str | None = None  # cuda if available, else cpu
    sleep_level: int = 0  # 1 or 2: put the engine to sleep while the trainer runs
    time_limit_s: float | None = None  # stop GRPO early after this many seconds (the final evaluation still runs)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelSource = field(default_factory=ModelSource)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(dtype="fp32", max_model_len=64))
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0 (off), 1 or 2, got {self.sleep_level}")
        if self.eval.enabled and self.task.holdout_fraction == 0.0:
            raise ValueError("eval.enabled needs a held-out split: set task.holdout_fraction > 0")
        if self.trainer.model == "parity":
            self._check_parity_trainer()

    def _check_parity_trainer(self) -> None:
        """parity's model computes in the engine's dtype and kernels; say so rather than train something else."""
        if not self.engine.deterministic:
            raise ValueError("trainer.model=parity matches the rollout bit for bit only with batch-invariant "
                             "kernels: set engine.deterministic=true")
        if self.engine.dtype == "auto":
            return  # resolved with the device; GRPOTrainer checks it then
        dtype = dtype_name(resolve_dtype(self.engine.dtype))
        if dtype == "fp16":
            raise ValueError("trainer.model=parity with engine.dtype=fp16 needs loss scaling, which parity's trainer "
                             "does not do: use engine.dtype=bf16 or fp32")
        if self.optim.mixed_precision != dtype:
            raise ValueError(f"trainer.model=parity computes in the engine's dtype ({dtype}): set "
                             f"optim.mixed_precision={dtype} (got {self.optim.mixed_precision}); float32 master "
                             "weights stay in the optimizer")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, key: str, default: Any = None) -> Any:
    """Check (and for numbers, convert) one YAML value against its field's type hint. A section
    (dataclass) starts from the field's default, so a partial section keeps the other defaults."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(hint, value, key + ".", default if isinstance(default, hint) else None)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or (hint is int and isinstance(value, float)):
            raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
        try:
            return hint(value)  # YAML reads "1e-3" as a string
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}") from None
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """`base` (default: `cls()`) with the fields given in a (YAML) mapping replaced; unknown keys
    raise ValueError with their path."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                         f"{prefix.rstrip('.') or 'the top level'} accepts {', '.join(sorted(names))}")
    values = {k: _coerce(v, hints[k], prefix + k, getattr(base, k)) for k, v in data.items()}
    try:
        return dataclasses.replace(base, **values)
    except ValueError as e:  # the section's own check (__post_init__): say which section
        raise ValueError(f"{prefix.rstrip('.')}: {e}" if prefix else str(e)) from None


def _parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, with a syntax error as one ValueError line naming the source, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{source}: invalid YAML{where}: {problem}") from None


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested mapping."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {p} is not a section")
    node[leaf] = _parse_yaml(raw, f"override {assignment!r}")


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """TrainConfig from a YAML file (None = defaults), then `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = _parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for assignment in overrides or []:
        apply_override(data, assignment)
    return from_dict(TrainConfig, data)
