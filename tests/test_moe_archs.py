"""Mixtral and OLMoE on the Qwen3-MoE code: tiny checkpoints written by HF transformers (random init, per-expert
safetensors in each architecture's own names) loaded through `Engine.from_pretrained`, against HF's forward;
deterministic mode alone vs batched; weight sync from an HF model's in-memory names; what is refused."""

from __future__ import annotations

import pytest
import torch
from moe_reference import PROMPTS, hf_logprobs, rerouting_delta, spread_norms_and_routers
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig

from parity import Engine, SamplingParams
from parity.models.config import ModelConfig, UnsupportedModelError
from parity.testing.factory import train_tokenizer

SHAPES = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512, initializer_range=0.3,
              tie_word_embeddings=False, rms_norm_eps=1e-6)
ARCHS = {
    "mixtral": (MixtralConfig, "MixtralForCausalLM", dict(num_local_experts=8)),
    "olmoe": (OlmoeConfig, "OlmoeForCausalLM", dict(num_experts=8, norm_topk_prob=False)),
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, max_tokens=8, ignore_eos=True, seed=3)


def hf_config(arch: str, vocab_size: int, eos: int, **overrides):
    config_class, name, extra = ARCHS[arch]
    cfg = config_class(vocab_size=vocab_size, **{**SHAPES, **extra, **overrides}, eos_token_id=eos,
                       pad_token_id=eos, bos_token_id=None)
    cfg.architectures = [name]
    return cfg


def write_tiny(path, arch: str, seed: int = 0, **overrides):
    """A 2-layer, 8-expert model of `arch` saved by transformers, with the factory's tokenizer; `overrides`
    change SHAPES."""
    tokenizer = train_tokenizer(384)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, len(tokenizer), eos, **overrides), dtype=torch.float32)
    spread_norms_and_routers(model).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def tiny(request, tmp_path_factory):
    """(architecture, model dir, HF model loaded from it)."""
    path = write_tiny(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_checkpoint_names_are_the_architectures_own(tiny):
    """The files hold per-expert tensors in each architecture's own names (Mixtral: block_sparse_moe.*.w1/w2/w3),
    which parity loads into fused experts on every layer; OLMoE's q/k norms span the whole projection."""
    from safetensors import safe_open

    arch, path, _ = tiny
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        names = set(f.keys())
    expert = {"mixtral": "block_sparse_moe.experts.7.w2.weight", "olmoe": "mlp.experts.7.down_proj.weight"}[arch]
    assert f"model.layers.1.{expert}" in names
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.moe_layers == (0, 1) and cfg.moe_intermediate_size == SHAPES["intermediate_size"]
    assert cfg.norm_topk_prob == (arch == "mixtral")
    if arch == "olmoe":
        with safe_open(f"{path}/model.safetensors", "pt") as f:
            assert f.get_slice("model.layers.0.self_attn.q_norm.weight").get_shape() == [SHAPES["hidden_size"]]


@pytest.mark.parametrize("deterministic", [False, True])
def test_greedy_matches_hf(tiny, deterministic):
    _, path, hf = tiny
    engine = Engine.from_pretrained(path, dtype="fp32", device="cpu", deterministic=deterministic)
    for r in engine.generate(PROMPTS, GREEDY):
        assert len(r.output_ids) == GREEDY.max_tokens
        ref_logp, ref_argmax = hf_logprobs(hf, r.prompt_ids, r.output_ids)
        assert r.output_ids == ref_argmax.tolist()
        torch.testing.assert_close(torch.tensor(r.output_logprobs), ref_logp, atol=1e-4, rtol=0)


def test_deterministic_alone_equals_batched_bitwise(tiny):
    _, path, _ = tiny
    engine = Engine.from_pretrained(path, dtype="fp32", device="cpu", deterministic=True)
    batch = engine.generate(PROMPTS + ["What is 12 + 34?", "Sort the list 5 3 9 1"], SAMPLED)
    alone = engine.generate(PROMPTS[1:], SAMPLED)[0]
    assert alone.output_ids == batch[1].output_ids
    assert alone.output_logprobs == batch[1].output_logprobs


def test_weight_sync_from_hf_in_memory_names(tiny):
    """An HF model's state dict (fused experts; Mixtral's router as `mlp.gate`, not its checkpoint name) syncs,
    and the engine then equals HF's forward under the new weights."""
    _, path, _ = tiny
    engine = Engine.from_pretrained(path, dtype="fp32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hf.model.layers[0].mlp.experts.down_proj.mul_(1.5)
        router = hf.model.layers[1].mlp.gate.weight
        router.copy_(torch.randn_like(router))
    assert "model.layers.1.mlp.gate.weight" in hf.state_dict()
    engine.update_weights(hf)
    r = engine.generate(PROMPTS[1:], GREEDY)[0]
    ref_logp, ref_argmax = hf_logprobs(hf, r.prompt_ids, r.output_ids)
    assert r.output_ids == ref_argmax.tolist()
    torch.testing.assert_close(torch.tensor(r.output_logprobs), ref_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("arch", "overrides", "field"), [
    ("mixtral", dict(sliding_window=128), "sliding_window=128"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0"),
    ("olmoe", dict(attention_bias=True), "attention_bias=True"),
    ("mixtral", dict(num_local_experts=2, num_experts_per_tok=3), "num_experts_per_tok=3"),
])
def test_unimplemented_config_is_refused_naming_the_field(arch, overrides, field):
    with pytest.raises(UnsupportedModelError, match=field):
        ModelConfig.from_hf_config(hf_config(arch, 384, 0, **overrides))


def test_mixtral_window_as_wide_as_the_context_is_full_attention():
    cfg = hf_config("mixtral", 384, 0, sliding_window=SHAPES["max_position_embeddings"])
    assert ModelConfig.from_hf_config(cfg).moe_layers == (0, 1)


def test_hf_mixtral_replay_routes_through_the_rollouts_experts(tmp_path):
    """trainer_logprobs on an HF Mixtral whose router picks other experts: its own routing moves the logprobs,
    replaying the engine's experts gives the rollout's back (Mixtral's router always renormalises)."""
    from parity.trainer.logprobs import trainer_logprobs
    from parity.trainer.parity_model import parity_model_from_engine

    path = write_tiny(tmp_path / "mixtral", "mixtral")
    engine = Engine.from_pretrained(path, dtype="fp32", device="cpu", deterministic=True)
    params = SamplingParams(temperature=0.9, max_tokens=8, ignore_eos=True, seed=5, return_routed_experts=True)
    rollouts = engine.generate(PROMPTS + ["What is 12 + 34? The answer is"], params)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    err = lambda t: (t.logprobs - t.rollout_logprobs)[t.mask].abs().max()
    assert err(trainer_logprobs(hf, rollouts, params, replay_routing=True)) < 1e-4
    with torch.no_grad():
        e, delta = rerouting_delta(parity_model_from_engine(engine, trainable=False), rollouts)
        hf.model.layers[0].mlp.gate.weight[e] += delta
    assert err(trainer_logprobs(hf, rollouts, params)) > 1e-2
    assert err(trainer_logprobs(hf, rollouts, params, replay_routing=True)) < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels run in the other tests")
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_engine_on_the_triton_kernels_in_the_interpreter(tmp_path, monkeypatch, arch):
    """The CUDA path (Triton kernels, interpreted on CPU tensors), one layer: OLMoE's projection-wide q/k norm runs
    before the fused RoPE kernel, Mixtral's router renormalises; fast mode's greedy tokens and logprobs equal
    HF's (fp32, 1e-4); deterministic mode alone == in a batch with chunked prefill, bit for bit."""
    pytest.importorskip("triton")
    from parity.kernels import dispatch

    path = write_tiny(tmp_path / arch, arch, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    monkeypatch.setattr(dispatch, "device_kind", lambda x: "cuda")
    options = dict(dtype="fp32", max_model_len=128, max_num_batched_tokens=8, kv_cache_memory=1 << 20)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (4, 13)]
    r = Engine.from_pretrained(path, **options).generate(prompts[1:], SamplingParams(temperature=0, max_tokens=3,
                                                                                      ignore_eos=True))[0]
    ref_logp, ref_argmax = hf_logprobs(hf, r.prompt_ids, r.output_ids)
    assert r.output_ids == ref_argmax.tolist()
    torch.testing.assert_close(torch.tensor(r.output_logprobs), ref_logp, atol=1e-4, rtol=0)

    engine = Engine.from_pretrained(path, deterministic=True, **options)
    params = SamplingParams(temperature=0.8, max_tokens=3, seed=3, ignore_eos=True)
    batch = engine.generate(prompts, params)
    alone = engine.generate([prompts[1]], params)[0]
    assert alone.output_ids == batch[1].output_ids and alone.output_logprobs == batch[1].output_logprobs
