"""Triton kernels (CUDA only); each has a plain-torch definition in `parity.kernels.reference`."""
