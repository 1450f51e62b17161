"""What a trainer can hand to `Engine.update_weights`, turned into validated (HF name, tensor) pairs.

Accepted sources:
  - an `nn.Module` (HF `AutoModelForCausalLM`, possibly wrapped by DDP / accelerate / torch.compile /
    FSDP2, whose sharded parameters are DTensors gathered one at a time with `full_tensor()`; or
    parity's own trainer `DecoderModel`, read through HF-named views of its fused parameters),
  - a state dict (`Mapping[str, Tensor]`, HF names),
  - an iterable of `(name, tensor)` pairs (what verl hands to `load_weights`).

Every name, shape, dtype, device and value (inf/nan) is checked before the first copy, so a bad update
is refused whole and the old weights, version and prefix cache stay. The values are read once for the
inf/nan check (host tensors on the engine's device, one at a time: see `_all_finite`), then streamed
tensor by tensor into the parameters: peak extra memory is one tensor (plus its cast copy, plus the
gathered full tensor of a DTensor). A
one-shot iterator cannot be inspected without consuming it, so it is materialised first: that holds
every tensor it yields until the copy ends. That is free when they are views of live parameters, and a
full extra model copy when the iterator builds new tensors; pass the module or a state dict to avoid it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from parity.models.decoder import DecoderModel
from parity.models.weights import WeightError, WeightMap, hf_named_weights

WeightSource = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


@dataclass
class WeightSyncStats:
    weight_version: int  # the engine's version after this update
    num_tensors: int  # source tensors copied (ignored buffers and tied aliases not counted)
    bytes_copied: int  # bytes written into engine parameters (engine dtype)
    num_gathered: int  # DTensors gathered with full_tensor()
    seconds: float  # wall time of validation + copies (device synchronised)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_copied / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def unwrap_module(module: nn.Module) -> nn.Module:
    """Strip DDP / accelerate (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        return module


def named_tensors(source: WeightSource) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs without copying data: module state dicts and mappings hold references."""
    if isinstance(source, nn.Module):
        module = unwrap_module(source)
        if isinstance(module, DecoderModel):  # parity's own trainer model: fused layout -> HF-named views
            return list(hf_named_weights(module))
        return list(module.state_dict().items())
    if isinstance(source, Mapping):
        return list(source.items())
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise TypeError(
            f"update_weights needs an nn.Module, a state dict or an iterable of (name, tensor) pairs, "
            f"got {type(source).__name__}"
        )
    pairs = []
    for item in source:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"weight iterable must yield (name, tensor) pairs, got {type(item).__name__}")
        pairs.append((str(item[0]), item[1]))
    return pairs


def validate_update(weights: WeightMap, pairs: list[tuple[str, torch.Tensor]], partial: bool,
                    device: torch.device) -> None:
    """Refuse the whole update unless every tensor fits: names, shapes, a floating dtype, real data (not
    the meta device) and finite values. Raises WeightError naming the tensor, before anything is copied.
    `device` is where the engine's parameters live; host tensors are checked for inf/nan there."""
    for name, t in pairs:
        if not t.is_floating_point():
            raise WeightError(f"tensor {name!r} has dtype {t.dtype}, expected a floating-point weight")
        if t.is_meta:
            raise WeightError(f"tensor {name!r} is on the meta device (it has no data); materialise it first")
    weights.validate([(name, tuple(t.shape)) for name, t in pairs], require_all=not partial)
    copied = [(name, t) for name, t in pairs if weights.normalize(name) is not None]
    finite = _all_finite([t for _, t in copied], device)
    bad = next((name for (name, _), ok in zip(copied, finite) if not ok), None)
    if bad is not None:
        raise WeightError(f"tensor {bad!r} has inf or nan values; the update was refused and nothing was copied")


def _all_finite(tensors: list[torch.Tensor], device: torch.device) -> list[bool]:
    """Whether each tensor is finite, with one device-to-host copy per device. A host tensor is checked on
    `device` (the engine's), copied there one tensor at a time, since it is copied there next anyway:
    isfinite over host memory runs on one thread in a Ray actor and costs seconds per billion parameters
    (about 25 s at 8B), where a GPU takes milliseconds. On a CPU engine the host tensor is checked in
    place. A DTensor reduces over its mesh, so every rank gets the same answer."""
    flags: list[torch.Tensor] = []
    for t in tensors:
        t = t.detach()
        if is_dtensor(t):
            flags.append(torch.isfinite(t).logical_not().sum().full_tensor() == 0)
        else:
            flags.append(torch.isfinite(t.to(device) if t.device.type == "cpu" else t).all())
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    result = [True] * len(flags)
    for indices in by_device.values():
        for i, ok in zip(indices, torch.stack([flags[i] for i in indices]).tolist()):
            result[i] = bool(ok)
    return result
