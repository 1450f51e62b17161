"""Trainer-side recomputation of the logprobs of already-sampled tokens.

`hf_token_logprobs` is what a usual RL trainer does: load the HF model in its training dtype, run one
full forward over prompt + response (right-padded micro-batches), upcast the logits to float32,
divide by the sampling temperature, log-softmax over the whole vocabulary and gather the sampled
tokens. `parity_token_logprobs` runs parity's own trainer-side forward on the engine's model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from parity.precision.dtypes import resolve_dtype


def effective_temperature(temperature: float) -> float:
    """The temperature logprobs are taken under: greedy (0) reports the unscaled distribution."""
    return temperature if temperature > 0 else 1.0


def load_hf_model(path: str, dtype: str, device: torch.device):
    """AutoModelForCausalLM (from an HF directory or a .gguf file) in `dtype` on `device`, eval mode
    (`dtype=` since transformers 4.56)."""
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    from parity.models.gguf import is_gguf

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs = {key: resolve_dtype(dtype)}
    if is_gguf(path):  # transformers dequantizes GGUF itself (through the `gguf` package)
        path, kwargs["gguf_file"] = str(Path(path).parent), Path(path).name
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()


@torch.no_grad()
def hf_token_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    temperature: float = 1.0,
    micro_batch: int = 8,
) -> list[list[float]]:
    """Per-token logprobs of `output_ids[i]` given `prompt_ids[i]` under an HF causal LM."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    device = next(model.parameters()).device
    temp = effective_temperature(temperature)
    out: list[list[float]] = []
    for start in range(0, len(prompt_ids), micro_batch):
        prompts, outputs = prompt_ids[start : start + micro_batch], output_ids[start : start + micro_batch]
        seqs = [list(p) + list(o) for p, o in zip(prompts, outputs)]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, (p, o) in enumerate(zip(prompts, outputs)):
            rows = logits[i, len(p) - 1 : len(p) + len(o) - 1].float() / temp
            logp = torch.log_softmax(rows, dim=-1)
            targets = torch.tensor(list(o), dtype=torch.long, device=device)
            out.append(logp.gather(1, targets[:, None])[:, 0].double().cpu().tolist())
        del logits
    return out


@torch.no_grad()
def parity_token_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    temperature: float = 1.0,
    micro_batch: int = 8,
) -> list[list[float]]:
    """Per-token logprobs from parity's trainer-side forward on the engine's `DecoderModel`, packing
    `micro_batch` sequences per forward (the full-vocabulary logits of every row are materialised)."""
    from parity.trainer.parity_model import token_logprobs

    out: list[list[float]] = []
    for start in range(0, len(prompt_ids), micro_batch):
        result = token_logprobs(model, [list(p) for p in prompt_ids[start : start + micro_batch]],
                                [list(o) for o in output_ids[start : start + micro_batch]],
                                temperature=effective_temperature(temperature))
        out += [r.double().cpu().tolist() for r in result]
    return out
