"""GGUF checkpoints (llama.cpp's single-file format): config, tokenizer and weights, dequantized once.

Config and tokenizer (with its chat template) come from transformers' GGUF readers, weights from the
`gguf` package, dequantized to float32 under HF names, then through the same validate-then-copy
`WeightMap` as safetensors. Parsed metadata is cached per file (a 49k-entry tokenizer takes seconds).
llama.cpp permutes Llama's q/k rows for its rotary layout; `_unpermute_rotary` restores HF's order.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from parity.models.aliases import cache_root
from parity.models.config import ModelConfig, UnsupportedModelError
from parity.models.weights import WeightMap

# GGUF `general.architecture` -> the HF architecture name our ModelConfig reads.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Architectures whose q/k rows llama.cpp's converter permutes for its rotary layout.
_PERMUTED_QK = {"llama"}
# llama.cpp's per-frequency RoPE divisors (Llama 3.x scaling). Not a weight: checked against the RoPE that
# the config gives (transformers does not read Llama's RoPE scaling from GGUF metadata).
_ROPE_FREQS = "rope_freqs.weight"


def _require_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("loading a .gguf model needs the `gguf` package: pip install 'gguf>=0.10'") from e
    return gguf


def _file_key(path: Path) -> tuple[str, int, int]:
    """Cache key that changes when the file does."""
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=2)
def _read_hf_config(key: tuple[str, int, int]):
    from transformers import AutoConfig

    path = Path(key[0])
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as e:  # transformers: "GGUF model with architecture X is not supported yet."
        raise UnsupportedModelError(f"cannot read {path}: {e}") from e


@functools.lru_cache(maxsize=2)
def _read_tokenizer(key: tuple[str, int, int]):
    from transformers import AutoTokenizer

    path = Path(key[0])
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.lru_cache(maxsize=2)
def _reader(key: tuple[str, int, int]):
    return _require_gguf().GGUFReader(key[0])


def load_gguf_config(path: Path) -> ModelConfig:
    """ModelConfig from the GGUF metadata (the HF architecture name derived from `general.architecture`)."""
    _require_gguf()
    hf_config = copy.deepcopy(_read_hf_config(_file_key(path)))
    if not getattr(hf_config, "architectures", None):
        arch = GGUF_ARCHITECTURES.get(hf_config.model_type)
        if arch is None:
            raise UnsupportedModelError(
                f"{path.name}: GGUF architecture {hf_config.model_type!r} is not supported; "
                f"parity reads {', '.join(GGUF_ARCHITECTURES)}"
            )
        hf_config.architectures = [arch]
    return ModelConfig.from_hf_config(hf_config)


def load_gguf_tokenizer(path: Path):
    """The tokenizer stored in the file, with its chat template (a private copy per caller).

    Its EOS is set to the model's (the id the engine stops on): transformers 5.17 reads SmolLM2's GGUF
    tokenizer with eos = <|im_start|> while the config says <|im_end|>, and code that ends training
    targets with `tokenizer.eos_token_id` then teaches a token the engine never stops on.
    """
    _require_gguf()
    tokenizer = copy.deepcopy(_read_tokenizer(_file_key(path)))
    eos_ids = load_gguf_config(path).eos_token_ids
    if eos_ids and tokenizer.eos_token_id not in eos_ids:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_ids[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute` of q/k rows: per head, (2, d/2) pair order back to HF's halves."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_to_hf_names(arch: str, cfg: ModelConfig, weights: WeightMap) -> dict[str, str]:
    """GGUF tensor name -> HF name, for every HF tensor the model expects (via gguf-py's own name table)."""
    gguf = _require_gguf()
    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        raise UnsupportedModelError(f"the installed gguf package does not know architecture {arch!r}")
    table = gguf.get_tensor_name_map(arch_enum, cfg.num_layers)
    names = {}
    for hf_name in [*weights.targets, "lm_head.weight"]:
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_name = table.get_name(stem)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _check_rope_freqs(path: Path, cfg: ModelConfig, divisors: np.ndarray) -> None:
    """The file's RoPE frequencies (base frequencies / `divisors`) must be the ones parity will use."""
    from parity.models.rope import inv_frequencies, rope_parameters

    base = rope_parameters(cfg.hf_config)["rope_theta"]
    d = cfg.head_dim
    stored = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)) / torch.from_numpy(np.array(divisors, np.float64))
    ours = inv_frequencies(cfg.hf_config, d)[0].double()
    if stored.shape != ours.shape or not torch.allclose(ours, stored, rtol=1e-4, atol=0):
        raise UnsupportedModelError(
            f"{path.name}: its rope_freqs tensor (RoPE scaling, e.g. Llama 3.1's) differs from the RoPE the "
            "metadata describes, which transformers' GGUF reader does not carry over; load the HF checkpoint instead"
        )


def iter_gguf_tensors(path: Path, cfg: ModelConfig, weights: WeightMap) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file, after validating all names and shapes."""
    gguf = _require_gguf()
    reader = _reader(_file_key(path))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    names = _gguf_to_hf_names(arch, cfg, weights)
    tensors = [t for t in reader.tensors if t.name != _ROPE_FREQS]
    rope_freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if rope_freqs is not None:
        _check_rope_freqs(path, cfg, gguf.dequantize(rope_freqs.data, rope_freqs.tensor_type))
    # GGUF lists dimensions fastest-first; HF's [out, in] is the reverse.
    weights.validate((names.get(t.name, t.name), tuple(int(n) for n in reversed(t.shape))) for t in tensors)
    permute = {"self_attn.q_proj.weight": cfg.num_heads, "self_attn.k_proj.weight": cfg.num_kv_heads}
    for t in tensors:
        hf_name = names[t.name]
        w = gguf.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if arch in _PERMUTED_QK:
            heads = next((h for suffix, h in permute.items() if hf_name.endswith(suffix)), None)
            if heads is not None:
                w = _unpermute_rotary(w, heads)
        yield hf_name, torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy


def load_gguf_checkpoint(weights: WeightMap, path: Path, cfg: ModelConfig) -> None:
    """Validate every tensor's name and shape, then dequantize and copy them one at a time."""
    for name, tensor in iter_gguf_tensors(path, cfg, weights):
        weights.copy(name, tensor)


def export_hf_dir(path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the GGUF as an HF model directory: config, safetensors (the weights parity loads, in `dtype`),
    tokenizer with its chat template, generation config with the EOS ids. For tools that take only HF
    directories (an HF trainer loading the policy); parity itself reads the .gguf directly."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from parity.models.decoder import DecoderModel
    from parity.precision.policy import PrecisionPolicy

    cfg = load_gguf_config(path)
    shapes_only = DecoderModel(cfg, PrecisionPolicy("fp32"), "meta", 1)  # names and shapes for validation
    tensors = {name: t.to(dtype) for name, t in iter_gguf_tensors(path, cfg, WeightMap(shapes_only, cfg))}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg.hf_config.dtype = dtype
    cfg.hf_config.save_pretrained(out_dir)
    GenerationConfig(eos_token_id=cfg.eos_token_ids, bos_token_id=cfg.bos_token_id).save_pretrained(out_dir)
    load_gguf_tokenizer(path).save_pretrained(out_dir)
    return out_dir


@functools.lru_cache(maxsize=8)
def _sha256(key: tuple[str, int, int]) -> str:
    digest = hashlib.sha256()
    with open(key[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_hf_dir(path: Path, cache_dir: Path | None = None) -> Path:
    """`export_hf_dir(path)` (fp32) written once under `cache_dir` (default `cache_root()`) and reused after.
    Keyed by the file's size and sha256, so a changed file gets a fresh export; written to a temporary
    folder and renamed, so an interrupted export never passes for a finished one."""
    path = Path(path)
    key = _file_key(path)
    out = Path(cache_dir or cache_root()) / "hf-from-gguf" / f"{path.stem}-{key[2]}-{_sha256(key)[:16]}"
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf_dir(path, tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same export first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").is_file():
            raise RuntimeError(f"{out} exists but holds no finished export; remove it and retry") from None
    return out
