"""Checks for public inputs: type, range and NaN/inf, with a message naming the field and the value.

Each check returns the value normalised to a plain Python type (a numpy int64 seed becomes an int),
so later code never meets a surprising type. Bools are refused where a number is expected: `n=True`
is a bug, not 1. A wrong type and a wrong value both raise ValueError, as vLLM's checks do.
These live at the bottom of the package so every layer (engine, models, trainer) checks alike.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def _in_range(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *, high_open: bool = False) -> int:
    """`value` as an int within [low, high] (or [low, high) with high_open); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {_shown(value)}")
    value = int(value)
    if not _in_range(value, low, high, False, high_open):
        raise ValueError(f"{name} must be {_bounds(low, high, False, high_open)}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a finite float within the bounds (open or closed at each end); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if not _in_range(value, low, high, low_open, high_open):
        raise ValueError(f"{name} must be {_bounds(low, high, low_open, high_open)}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a bool (True/False); ValueError for 0/1, strings and everything else."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_shown(value)}")
    return value


def check_int_list(name: str, value: Any, low: int | None = None) -> list[int]:
    """`value` as a list of ints >= low; a list or tuple is accepted, a string, a scalar or None are not."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of ints, got {_shown(value)}")
    return [check_int(f"{name}[{i}]", v, low) for i, v in enumerate(value)]


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """`value` if it is one of `choices`; ValueError listing them otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_no_nan(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """ValueError naming the first tensor with NaN where `mask` is set (NaN would turn every statistic into NaN)."""
    for name, tensor in tensors.items():
        bad = torch.isnan(tensor) & mask
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"nan in {name} under the mask ({int(bad.sum())} token(s), first at {list(where)})")
