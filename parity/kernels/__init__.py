"""Kernels behind one interface: Triton on CUDA, plain torch elsewhere, fast or batch-invariant.

`parity.kernels.dispatch` is what model code calls (its table picks the implementation); `reference`
holds the definitions.
"""

from parity.kernels.metadata import AttentionMetadata

__all__ = ["AttentionMetadata"]
