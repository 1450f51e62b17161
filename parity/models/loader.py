"""The one model loader: an HF directory (safetensors), a .gguf file or a model alias -> a filled model.

Everything that builds a parity model from disk (the engine, tensor parallelism, the trainer-side
parity model, diagnose) goes through `load`, and `Checkpoint` holds the one "is this a GGUF?" branch.
Weights always pass the same validate-then-copy `WeightMap`, so a bad checkpoint fails before any copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from parity.models import gguf
from parity.models.aliases import resolve_model_path
from parity.models.config import ModelConfig
from parity.models.decoder import DecoderModel
from parity.models.weights import WeightMap, load_checkpoint
from parity.precision.policy import PrecisionPolicy


@dataclass(frozen=True)
class Checkpoint:
    """A model on disk: an HF directory or a GGUF file. Its config is read once."""

    path: Path

    @classmethod
    def resolve(cls, name: str | Path | Checkpoint, gguf_file: str | None = None) -> Checkpoint:
        """A model alias, an HF directory, a .gguf file, or a directory plus `gguf_file`."""
        if isinstance(name, Checkpoint):
            return name
        checkpoint = cls(resolve_model_path(name, gguf_file))
        if not checkpoint.is_gguf and not (checkpoint.path / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint.path} is not an HF model directory (no config.json) or a .gguf file")
        return checkpoint

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"

    @functools.cached_property
    def config(self) -> ModelConfig:
        return gguf.load_gguf_config(self.path) if self.is_gguf else ModelConfig.from_pretrained(self.path)

    def tokenizer(self):
        """A fresh tokenizer (callers may change its pad or EOS token)."""
        if self.is_gguf:
            return gguf.load_gguf_tokenizer(self.path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def fill(self, weights: WeightMap) -> None:
        """Validate every tensor's name and shape, then copy them into the model behind `weights`."""
        if self.is_gguf:
            gguf.load_gguf_checkpoint(weights, self.path, self.config)
        else:
            load_checkpoint(weights, self.path)

    def hf_dir(self) -> Path:
        """An HF directory holding these weights, for tools that read only those (an HF trainer):
        the directory itself, or the GGUF dequantized once into parity's cache."""
        return gguf.cached_hf_dir(self.path) if self.is_gguf else self.path

    def hf_pretrained_args(self) -> tuple[str, dict]:
        """(path, keyword arguments) for transformers' `from_pretrained`, which dequantizes a GGUF itself."""
        if self.is_gguf:
            return str(self.path.parent), {"gguf_file": self.path.name}
        return str(self.path), {}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Builds the (empty) model: DecoderModel, or a subclass such as a tensor-parallel shard.
ModelBuilder = Callable[[ModelConfig, PrecisionPolicy, torch.device, int], DecoderModel]


@dataclass
class LoadedModel:
    model: DecoderModel
    tokenizer: object
    config: ModelConfig  # the checkpoint's (a tensor-parallel shard's model.config holds its local sizes)
    max_positions: int


def load(
    path: str | Path | Checkpoint,
    policy: PrecisionPolicy,
    device: str | torch.device | None = None,
    max_positions: int | None = None,
    *,
    build: ModelBuilder = DecoderModel,
    weight_map: Callable[[DecoderModel], WeightMap] | None = None,
) -> LoadedModel:
    """Build `build(config, policy, device, max_positions)` and fill it from the checkpoint.

    `max_positions` (the RoPE table length) defaults to the checkpoint's max_position_embeddings;
    `device` to CUDA when present. `weight_map(model)` says where each tensor lands (default: the whole
    tensor into `WeightMap(model, config)`; tensor parallelism passes one that copies only its shard).
    """
    checkpoint = Checkpoint.resolve(path)
    cfg = checkpoint.config
    if max_positions is not None and max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    if max_positions is not None and max_positions > cfg.max_position_embeddings:  # the engine's max_model_len
        raise ValueError(f"max_model_len/max_positions={max_positions} exceeds the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    max_positions = max_positions or cfg.max_position_embeddings
    device = torch.device(device) if device is not None else default_device()
    model = build(cfg, policy, device, max_positions)
    checkpoint.fill(weight_map(model) if weight_map is not None else WeightMap(model, cfg))
    return LoadedModel(model, checkpoint.tokenizer(), cfg, max_positions)
