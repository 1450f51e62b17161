"""Shared fixtures: tiny factory models written once per test session, loaded like real checkpoints."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The switch is read when a kernel module is first
# imported, and any test module may import one first, so it is set here, before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from parity.testing.factory import ARCHITECTURES, TinyModelSpec, write_tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """One tiny random-init HF model directory per supported architecture."""
    root = tmp_path_factory.mktemp("models")
    return {a: str(write_tiny_model(root / a, TinyModelSpec(architecture=a))) for a in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> str:
    return model_dirs["llama"]


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One torch CPU thread for a module's tests: tiny models gain nothing from two OpenMP threads, and on a
    loaded 2-core machine their spinning makes small ops 10x slower. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_cpu_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
