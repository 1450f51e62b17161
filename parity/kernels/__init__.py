"""Kernels behind one interface: Triton on CUDA, the plain-torch reference elsewhere.

`parity.kernels.dispatch` is what model code calls; `reference` holds the definitions.
"""

from parity.kernels.metadata import AttentionMetadata

__all__ = ["AttentionMetadata"]
