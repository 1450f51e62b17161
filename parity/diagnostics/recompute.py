"""Trainer-side recomputation of the logprobs of already-sampled tokens.

For an HF model this is what a usual RL trainer does: one full forward over prompt + response
(right-padded micro-batches), logits upcast to float32, divided by the sampling temperature,
log-softmax over the whole vocabulary. For parity's `DecoderModel` it is the trainer-side parity
forward (`parity.trainer.parity_model.token_logprobs`, the engine's own code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from parity.models.decoder import DecoderModel
from parity.models.loader import Checkpoint
from parity.precision.dtypes import resolve_dtype


def effective_temperature(temperature: float) -> float:
    """The temperature logprobs are taken under: greedy (0) reports the unscaled distribution."""
    return temperature if temperature > 0 else 1.0


def load_hf_model(checkpoint: Checkpoint, dtype: str, device: torch.device):
    """AutoModelForCausalLM of the checkpoint (transformers dequantizes a GGUF itself) in `dtype` on
    `device`, eval mode (`dtype=` since transformers 4.56)."""
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    path, kwargs = checkpoint.hf_pretrained_args()
    model = AutoModelForCausalLM.from_pretrained(path, **{key: resolve_dtype(dtype)}, **kwargs)
    return model.to(device).eval()


def _hf_logprobs(model, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], temperature: float
                 ) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    seqs = [list(p) + list(o) for p, o in zip(prompts, outputs)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        logp = torch.log_softmax(logits[i, len(p) - 1 : len(p) + len(o) - 1].float() / temperature, dim=-1)
        out.append(logp.gather(1, torch.tensor(list(o), dtype=torch.long, device=device)[:, None])[:, 0])
    return out


def _parity_logprobs(model: DecoderModel, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                     temperature: float) -> list[torch.Tensor]:
    from parity.trainer.parity_model import token_logprobs

    return token_logprobs(model, [list(p) for p in prompts], [list(o) for o in outputs], temperature=temperature)


@torch.no_grad()
def recompute_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    temperature: float = 1.0,
    micro_batch: int = 8,
) -> list[list[float]]:
    """Per-token logprobs of `output_ids[i]` given `prompt_ids[i]` under `model` (an HF causal LM or
    parity's DecoderModel), `micro_batch` sequences per forward (each materialises full-vocabulary logits)."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    score = _parity_logprobs if isinstance(model, DecoderModel) else _hf_logprobs
    out: list[list[float]] = []
    for start in range(0, len(prompt_ids), micro_batch):
        end = start + micro_batch
        scored = score(model, prompt_ids[start:end], output_ids[start:end], effective_temperature(temperature))
        out += [t.double().cpu().tolist() for t in scored]
    return out
