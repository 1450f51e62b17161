"""Shared fixtures: tiny factory models written once per test session, loaded like real checkpoints."""

from __future__ import annotations

import pytest

from parity.testing.factory import ARCHITECTURES, TinyModelSpec, write_tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """One tiny random-init HF model directory per supported architecture."""
    root = tmp_path_factory.mktemp("models")
    return {a: str(write_tiny_model(root / a, TinyModelSpec(architecture=a))) for a in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> str:
    return model_dirs["llama"]
