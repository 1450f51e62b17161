"""HF checkpoint names -> the engine's fused parameter layout, with validation before any copy.

Both the checkpoint loader and in-process weight sync go through `WeightMap`: first every
(name, shape) is checked, then tensors are copied in place into the engine's parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from parity.models.config import ModelConfig


class WeightError(ValueError):
    """A checkpoint or weight update does not fit the model: missing, unexpected or mis-shaped tensors."""


# HF names that carry no weights of ours (buffers some checkpoints include).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class WeightTarget:
    param: str  # engine parameter name
    rows: tuple[int, int] | None  # row range inside a fused parameter, None = the whole tensor
    shape: tuple[int, ...]  # the HF tensor's expected shape
    expert: int | None = None  # index into a fused expert parameter [E, ...] (MoE), None = not an expert's

    def view(self, param: torch.Tensor) -> torch.Tensor:
        """The part of the engine parameter that this HF tensor fills."""
        if self.expert is not None:
            param = param[self.expert]
        return param if self.rows is None else param[self.rows[0] : self.rows[1]]


def build_weight_map(cfg: ModelConfig) -> dict[str, WeightTarget]:
    """Every HF tensor name the model expects, with where it lands and its shape."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.q_size, cfg.kv_size
    m: dict[str, WeightTarget] = {"model.embed_tokens.weight": WeightTarget("embed_tokens", None, (cfg.vocab_size, h))}
    m["model.norm.weight"] = WeightTarget("norm.weight", None, (h,))
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = WeightTarget("lm_head", None, (cfg.vocab_size, h))
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        m[f"{hf}.input_layernorm.weight"] = WeightTarget(f"{ours}.input_layernorm.weight", None, (h,))
        m[f"{hf}.post_attention_layernorm.weight"] = WeightTarget(f"{ours}.post_attention_layernorm.weight", None, (h,))
        qkv_rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        for proj, (a, b) in qkv_rows.items():
            m[f"{hf}.self_attn.{proj}.weight"] = WeightTarget(f"{ours}.self_attn.qkv_proj.weight", (a, b), (b - a, h))
            if cfg.attention_bias:
                m[f"{hf}.self_attn.{proj}.bias"] = WeightTarget(f"{ours}.self_attn.qkv_proj.bias", (a, b), (b - a,))
        m[f"{hf}.self_attn.o_proj.weight"] = WeightTarget(f"{ours}.self_attn.o_proj.weight", None, (h, q))
        if cfg.qk_norm:
            q_dim, k_dim = cfg.qk_norm_dims
            m[f"{hf}.self_attn.q_norm.weight"] = WeightTarget(f"{ours}.self_attn.q_norm.weight", None, (q_dim,))
            m[f"{hf}.self_attn.k_norm.weight"] = WeightTarget(f"{ours}.self_attn.k_norm.weight", None, (k_dim,))
        if i in cfg.moe_layers:
            m.update(_moe_layer_map(cfg, hf, ours))
            continue
        for proj, (a, b) in {"gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}.items():
            m[f"{hf}.mlp.{proj}.weight"] = WeightTarget(f"{ours}.mlp.gate_up_proj.weight", (a, b), (inter, h))
            if cfg.mlp_bias:
                m[f"{hf}.mlp.{proj}.bias"] = WeightTarget(f"{ours}.mlp.gate_up_proj.bias", (a, b), (inter,))
        m[f"{hf}.mlp.down_proj.weight"] = WeightTarget(f"{ours}.mlp.down_proj.weight", None, (h, inter))
        if cfg.mlp_bias:
            m[f"{hf}.mlp.down_proj.bias"] = WeightTarget(f"{ours}.mlp.down_proj.bias", None, (h,))
    return m


@dataclass(frozen=True)
class ExpertCheckpointNames:
    """How a sparse layer's tensors are named in the checkpoint files: `{block}.gate.weight` (the router)
    and `{block}.experts.{e}.{gate|up|down}.weight`."""

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


# Mixtral's checkpoints keep the original release's names (transformers 5 converts them on load and back
# on save); Qwen3-MoE and OLMoE name experts like a dense MLP.
EXPERT_CHECKPOINT_NAMES = {"mixtral": ExpertCheckpointNames("block_sparse_moe", "w1", "w3", "w2")}


def _expert_names(cfg: ModelConfig) -> ExpertCheckpointNames:
    return EXPERT_CHECKPOINT_NAMES.get(cfg.family, ExpertCheckpointNames())


def _moe_layer_map(cfg: ModelConfig, hf: str, ours: str) -> dict[str, WeightTarget]:
    """A sparse layer's router and per-expert checkpoint tensors, each into its slice of the fused experts."""
    h, inter, n = cfg.hidden_size, cfg.moe_intermediate_size, _expert_names(cfg)
    m = {f"{hf}.{n.block}.gate.weight": WeightTarget(f"{ours}.mlp.gate.weight", None, (cfg.num_experts, h))}
    for e in range(cfg.num_experts):
        for proj, rows in {n.gate: (0, inter), n.up: (inter, 2 * inter)}.items():
            m[f"{hf}.{n.block}.experts.{e}.{proj}.weight"] = WeightTarget(f"{ours}.mlp.experts.gate_up_proj", rows,
                                                                          (inter, h), e)
        m[f"{hf}.{n.block}.experts.{e}.{n.down}.weight"] = WeightTarget(f"{ours}.mlp.experts.down_proj", None,
                                                                        (h, inter), e)
    return m


def fused_expert_names(cfg: ModelConfig) -> dict[str, tuple[WeightTarget, list[str]]]:
    """HF transformers 5's in-memory names of a sparse layer (what an HF model's state dict holds): the fused
    experts `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I], and the router
    `mlp.gate.weight` where the checkpoint names it otherwise (Mixtral) -> the whole parameter, and the
    checkpoint names each one stands for."""
    e, h, inter, n = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, _expert_names(cfg)
    out: dict[str, tuple[WeightTarget, list[str]]] = {}
    for i in cfg.moe_layers:
        hf, ours, ckpt = f"model.layers.{i}.mlp", f"layers.{i}.mlp", f"model.layers.{i}.{n.block}"
        out[f"{hf}.experts.gate_up_proj"] = (
            WeightTarget(f"{ours}.experts.gate_up_proj", None, (e, 2 * inter, h)),
            [f"{ckpt}.experts.{x}.{p}.weight" for x in range(e) for p in (n.gate, n.up)])
        out[f"{hf}.experts.down_proj"] = (WeightTarget(f"{ours}.experts.down_proj", None, (e, h, inter)),
                                          [f"{ckpt}.experts.{x}.{n.down}.weight" for x in range(e)])
        if n.block != "mlp":
            out[f"{hf}.gate.weight"] = (WeightTarget(f"{ours}.gate.weight", None, (cfg.num_experts, h)),
                                        [f"{ckpt}.gate.weight"])
    return out


class WeightMap:
    """Validates and copies HF-named tensors into a DecoderModel's parameters, in place."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig):
        self.model = model
        self.targets = build_weight_map(cfg)
        self.fused = fused_expert_names(cfg)
        self.tied = cfg.tie_word_embeddings
        self.params = dict(model.named_parameters())

    def normalize(self, name: str) -> str | None:
        """HF name, tolerating wrapper prefixes (`module.`, `_orig_mod.`); None for names we ignore."""
        for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module."):
            name = name.replace(prefix, "")
        if name.endswith(_IGNORED_SUFFIXES) or (self.tied and name == "lm_head.weight"):
            return None
        return name

    def validate(self, shapes: Iterable[tuple[str, tuple[int, ...]]], require_all: bool = True) -> list[str]:
        """Check names and shapes; return the normalized names that will be copied. Raises WeightError."""
        seen: list[str] = []
        problems: list[str] = []
        for raw, shape in shapes:
            name = self.normalize(raw)
            if name is None:
                continue
            target, covers = self.fused.get(name, (self.targets.get(name), [name]))
            if target is None:
                problems.append(f"unexpected tensor {raw!r}")
            elif tuple(shape) != target.shape:
                problems.append(f"tensor {raw!r} has shape {tuple(shape)}, expected {target.shape}")
            else:
                seen.extend(covers)
        if require_all:
            missing = sorted(set(self.targets) - set(seen))
            if missing:
                more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                problems.append(f"missing tensor(s) {', '.join(missing[:5])}{more}")
        if problems:
            raise WeightError("; ".join(problems))
        return seen

    @torch.no_grad()
    def copy(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one validated HF tensor into its (slice of the) engine parameter, casting to its dtype."""
        name = self.normalize(name)
        if name is None:
            return
        target = self.fused[name][0] if name in self.fused else self.targets[name]
        dest = target.view(self.params[target.param].data)
        dest.copy_(tensor.to(device=dest.device, dtype=dest.dtype))


def safetensors_files(model_dir: Path) -> list[Path]:
    """Shards named by `model.safetensors.index.json`, else every `*.safetensors` file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{index.name} names shard(s) that are absent: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightError(f"no *.safetensors files in {model_dir}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


# safetensors dtype names of float tensors; an int or fp8 tensor is quantized data, never to be cast silently.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def load_checkpoint(weights: WeightMap, model_dir: Path) -> None:
    """Validate every tensor's name, shape and dtype from the file headers, then load them shard by
    shard, refusing a tensor with NaN/inf before it is copied."""
    files = safetensors_files(model_dir)
    shapes, not_float = [], []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                header = st.get_slice(name)
                shapes.append((name, tuple(header.get_shape())))
                if header.get_dtype() not in _FLOAT_DTYPES and weights.normalize(name) is not None:
                    not_float.append(f"{name} ({header.get_dtype()})")
    if not_float:
        raise WeightError(f"non-float checkpoint tensor(s) {', '.join(not_float[:5])}: parity loads fp16/bf16/fp32 "
                          "weights, not quantized or integer data")
    weights.validate(shapes)
    for name, tensor in iter_safetensors(files):
        if weights.normalize(name) is not None and not bool(torch.isfinite(tensor).all()):
            raise WeightError(f"checkpoint tensor {name!r} holds NaN or inf")
        weights.copy(name, tensor)


def hf_named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor view) of every checkpoint tensor, for weight sync into an engine (no copies)."""
    params = dict(model.named_parameters())
    for name, target in build_weight_map(model.config).items():
        yield name, target.view(params[target.param].detach())
