"""Precision policy, dtype names, mismatch metrics and importance-sampling corrections."""

from parity.precision.dtypes import DTYPE_NAMES, dtype_name, resolve_dtype

__all__ = ["DTYPE_NAMES", "dtype_name", "resolve_dtype"]
