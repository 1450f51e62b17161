"""Greedy tokens and per-token logprobs in float32 equal an HF transformers forward on the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from parity import Engine, SamplingParams
from parity.testing.factory import TinyModelSpec, write_tiny_model

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog. Once upon a time there was a small model"]


def hf_logprobs(hf_model, prompt_ids: list[int], output_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's logprob of each output token under teacher forcing, and HF's argmax at each position."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0].float(), dim=-1)[len(prompt_ids) - 1 : -1]
    return logp.gather(1, torch.tensor(output_ids)[:, None])[:, 0], logp.argmax(dim=-1)


def assert_matches_hf(model_dir: str, **engine_kwargs) -> None:
    engine = Engine.from_pretrained(model_dir, dtype="fp32", device="cpu", **engine_kwargs)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rollouts = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, raw_logprobs=True))
    assert len(rollouts) == len(PROMPTS)
    for r in rollouts:
        assert len(r.output_ids) == 24
        ref_logp, ref_argmax = hf_logprobs(hf, r.prompt_ids, r.output_ids)
        assert r.output_ids == ref_argmax.tolist()
        torch.testing.assert_close(torch.tensor(r.output_logprobs), ref_logp, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(r.output_raw_logprobs), ref_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_hf(model_dirs, arch):
    assert_matches_hf(model_dirs[arch])


def test_untied_sharded_checkpoint_matches_hf(tmp_path):
    """Untied LM head, sharded safetensors with an index file, head_dim != hidden/heads."""
    spec = TinyModelSpec(architecture="qwen3", tie_word_embeddings=False, head_dim=32)
    path = write_tiny_model(tmp_path / "m", spec, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert_matches_hf(str(path))


def test_chunked_prefill_and_small_blocks_match_hf(llama_dir):
    """Prompts longer than the token budget are prefilled in chunks across steps."""
    assert_matches_hf(llama_dir, max_num_batched_tokens=7, block_size=4)
