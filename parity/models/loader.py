"""The one model loader: an HF directory (safetensors), a .gguf file or a model alias -> a filled model.

Everything that builds a parity model from disk (the engine, tensor parallelism, the trainer-side
parity model, diagnose) goes through `load`; `Checkpoint.resolve` asks "is this a GGUF?" once and returns
an `HFCheckpoint` or a `GGUFCheckpoint`, which read config, tokenizer and weights their own way.
Weights always pass the same validate-then-copy `WeightMap`, so a bad checkpoint fails before any copy.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
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
class Checkpoint(ABC):
    """A model on disk; `resolve` picks the kind (HF directory or GGUF file) once. The config is read once."""

    path: Path
    is_gguf = False

    @classmethod
    def resolve(cls, name: str | Path | Checkpoint, gguf_file: str | None = None) -> Checkpoint:
        """A model alias, an HF directory, a .gguf file, or a directory plus `gguf_file`."""
        if isinstance(name, Checkpoint):
            return name
        path = resolve_model_path(name, gguf_file)
        if path.suffix.lower() == ".gguf":
            return GGUFCheckpoint(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not an HF model directory (no config.json) or a .gguf file")
        return HFCheckpoint(path)

    @functools.cached_property
    def config(self) -> ModelConfig:
        return self._read_config()

    @abstractmethod
    def _read_config(self) -> ModelConfig:
        """The checkpoint's ModelConfig, read from disk."""

    @abstractmethod
    def tokenizer(self):
        """A fresh tokenizer (callers may change its pad or EOS token)."""

    @abstractmethod
    def fill(self, weights: WeightMap) -> None:
        """Validate every tensor's name and shape, then copy them into the model behind `weights`."""

    @abstractmethod
    def hf_dir(self) -> Path:
        """An HF directory holding these weights, for tools that read only those (an HF trainer)."""

    @abstractmethod
    def hf_pretrained_args(self) -> tuple[str, dict]:
        """(path, keyword arguments) for transformers' `from_pretrained`."""


class HFCheckpoint(Checkpoint):
    """An HF model directory: config.json, safetensors (possibly sharded), tokenizer files."""

    def _read_config(self) -> ModelConfig:
        return ModelConfig.from_pretrained(self.path)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def fill(self, weights: WeightMap) -> None:
        load_checkpoint(weights, self.path)

    def hf_dir(self) -> Path:
        return self.path

    def hf_pretrained_args(self) -> tuple[str, dict]:
        return str(self.path), {}


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file: config, tokenizer and (dequantized) weights in one file."""

    is_gguf = True

    def _read_config(self) -> ModelConfig:
        return gguf.load_gguf_config(self.path)

    def tokenizer(self):
        return gguf.load_gguf_tokenizer(self.path)

    def fill(self, weights: WeightMap) -> None:
        gguf.load_gguf_checkpoint(weights, self.path, self.config)

    def hf_dir(self) -> Path:
        """The file dequantized once into parity's cache as an HF directory."""
        return gguf.cached_hf_dir(self.path)

    def hf_pretrained_args(self) -> tuple[str, dict]:
        """transformers dequantizes a GGUF itself, given the folder and the file name."""
        return str(self.path.parent), {"gguf_file": self.path.name}


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
