"""Qwen3-MoE: tiny checkpoints written by HF transformers (random init, per-expert tensors on disk) against HF's
own forward, the MoE kernels against their torch references, deterministic mode's batch invariance, routing
replay and weight sync of the experts."""

from __future__ import annotations

import pytest
import torch
from moe_reference import PROMPTS, hf_logprobs, rerouting_delta, spread_norms_and_routers
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from parity import Engine, SamplingParams
from parity.kernels import invariant, reference
from parity.testing.factory import train_tokenizer

TINY_MOE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)


def write_tiny_moe(path, *, mlp_only_layers=(1,), norm_topk_prob=True, decoder_sparse_step=1, seed=0, **shapes):
    """A 3-layer Qwen3-MoE (8 experts, 2 per token) saved by transformers, with the factory's tokenizer;
    `shapes` override TINY_MOE's."""
    tokenizer = train_tokenizer(384)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen3MoeConfig(
        vocab_size=len(tokenizer), **{**TINY_MOE, **shapes}, decoder_sparse_step=decoder_sparse_step,
        mlp_only_layers=list(mlp_only_layers), norm_topk_prob=norm_topk_prob, max_position_embeddings=512,
        initializer_range=0.3, tie_word_embeddings=False, eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
        rms_norm_eps=1e-6)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    torch.manual_seed(seed)
    model = spread_norms_and_routers(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return str(write_tiny_moe(tmp_path_factory.mktemp("qwen3moe")))


@pytest.fixture(scope="module")
def hf_moe(moe_dir):
    return AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()


def test_checkpoint_is_per_expert_and_layers_follow_hf(moe_dir, hf_moe):
    """The file holds one tensor per expert; parity builds the sparse and dense layers HF builds."""
    from safetensors import safe_open

    with safe_open(f"{moe_dir}/model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names  # mlp_only_layers=[1]
    engine = Engine.from_pretrained(moe_dir, dtype="fp32", device="cpu")
    assert engine.model.config.moe_layers == (0, 2)
    hf_sparse = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf_moe.model.layers]
    ours = [hasattr(layer.mlp, "experts") for layer in engine.model.layers]
    assert ours == hf_sparse == [True, False, True]


@pytest.mark.parametrize("deterministic", [False, True])
def test_greedy_matches_hf(moe_dir, hf_moe, deterministic):
    engine = Engine.from_pretrained(moe_dir, dtype="fp32", device="cpu", deterministic=deterministic)
    rollouts = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for r in rollouts:
        assert len(r.output_ids) == 16
        ref_logp, ref_argmax = hf_logprobs(hf_moe, r.prompt_ids, r.output_ids)
        assert r.output_ids == ref_argmax.tolist()
        torch.testing.assert_close(torch.tensor(r.output_logprobs), ref_logp, atol=1e-4, rtol=0)


def test_unrenormalised_and_sparse_step_match_hf(tmp_path):
    """norm_topk_prob=False and decoder_sparse_step=2 (every second layer sparse)."""
    path = write_tiny_moe(tmp_path / "m", mlp_only_layers=(), norm_topk_prob=False, decoder_sparse_step=2, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine.from_pretrained(str(path), dtype="fp32", device="cpu")
    assert engine.model.config.moe_layers == (1,)
    r = engine.generate(PROMPTS[1:], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    ref_logp, ref_argmax = hf_logprobs(hf, r.prompt_ids, r.output_ids)
    assert r.output_ids == ref_argmax.tolist()
    torch.testing.assert_close(torch.tensor(r.output_logprobs), ref_logp, atol=1e-4, rtol=0)


def test_bad_moe_config_is_refused(tmp_path):
    from parity.models.config import ModelConfig, UnsupportedModelError

    cfg = Qwen3MoeConfig(num_experts=4, num_experts_per_tok=6, num_hidden_layers=2)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=6"):
        ModelConfig.from_hf_config(cfg)


def test_tensor_parallel_refuses_moe(moe_dir):
    from parity.distributed.tensor_parallel import TensorParallelDecoder
    from parity.models.config import ModelConfig
    from parity.precision.policy import PrecisionPolicy

    cfg = ModelConfig.from_pretrained(moe_dir)
    with pytest.raises(ValueError, match="does not shard mixture-of-experts layers"):
        TensorParallelDecoder(cfg, PrecisionPolicy(dtype="fp32"), "cpu", 64)


# ----------------------------------------------------------------------------------------- kernels
def _hf_experts(x, gate_up, down, weights, ids):
    """HF's Qwen3MoeExperts loop, written out (one-hot mask, per-expert GEMMs, index_add)."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(ids == e)
        if token.numel():
            g, u = torch.nn.functional.linear(x[token], gate_up[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, down[e]) * weights[token, slot, None]
            out.index_add_(0, token, y)
    return out


def _moe_inputs(num_tokens=13, hidden=24, inter=16, experts=6, k=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g, dtype=dtype)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g, dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g, dtype=dtype) / inter**0.5
    logits = torch.randn(num_tokens, experts, generator=g, dtype=dtype)
    return x, gate_up, down, logits, k


@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_moe_equals_hf_loop(renormalize):
    x, gate_up, down, logits, k = _moe_inputs()
    weights, ids = reference.moe_route(logits, k, renormalize)
    probs = torch.softmax(logits.float(), -1)
    top, top_ids = torch.topk(probs, k)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(weights, top.double(), atol=1e-7, rtol=0)
    want = _hf_experts(x, gate_up, down, weights, ids)
    torch.testing.assert_close(reference.fused_moe(x, gate_up, down, weights, ids), want, atol=1e-12, rtol=0)
    # deterministic mode's per-token kernel computes in float32 (as its linear does): to float32 rounding
    f32 = [t.float() for t in (x, gate_up, down, weights)]
    torch.testing.assert_close(invariant.fused_moe(*f32, ids).double(), want, atol=1e-5, rtol=0)


def test_moe_sort_groups_pairs_by_expert():
    ids = torch.tensor([[3, 0], [0, 2], [3, 1]])
    order, offsets = reference.moe_sort(ids, 5)
    assert offsets.tolist() == [0, 2, 3, 4, 6, 6]
    assert ids.reshape(-1)[order].tolist() == [0, 0, 1, 2, 3, 3]
    assert order.tolist() == [1, 2, 5, 3, 0, 4]  # stable: pair order within an expert


def test_replayed_route_takes_the_given_experts():
    _, _, _, logits, k = _moe_inputs()
    chosen = torch.stack([torch.tensor([5, 0])] * logits.shape[0])
    weights, ids = reference.moe_route(logits, k, True, chosen)
    assert torch.equal(ids, chosen)
    probs = torch.softmax(logits.float(), -1)[:, [5, 0]]
    torch.testing.assert_close(weights, (probs / probs.sum(-1, keepdim=True)).double(), atol=1e-7, rtol=0)
    inv_w, inv_ids = invariant.moe_route(logits, k, True, chosen)
    assert torch.equal(inv_ids, chosen) and torch.equal(inv_w, weights)


# ------------------------------------------------------------------------------------ deterministic
SAMPLED = SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True, seed=3)


@pytest.fixture(scope="module")
def det_engine(moe_dir):
    return Engine.from_pretrained(moe_dir, dtype="fp32", device="cpu", deterministic=True)


def test_deterministic_moe_alone_batched_chunked_and_trainer_bitwise(moe_dir, det_engine):
    """The same prompt alone, beside others, and prefilled in chunks of 5 tokens gives the same tokens and
    logprobs bit for bit, and the trainer's parity forward (autograd on) scores them bit for bit."""
    from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

    batch = det_engine.generate(PROMPTS + ["What is 12 + 34?", "Sort the list 5 3 9 1"], SAMPLED)
    alone = det_engine.generate(PROMPTS[1:], SAMPLED)[0]
    chunked = Engine.from_pretrained(moe_dir, dtype="fp32", device="cpu", deterministic=True,
                                     max_num_batched_tokens=5, block_size=4).generate(PROMPTS[1:], SAMPLED)[0]
    for r in (alone, chunked):
        assert r.output_ids == batch[1].output_ids
        assert r.output_logprobs == batch[1].output_logprobs
    trainer = parity_model_from_engine(det_engine)
    scored = token_logprobs(trainer, [r.prompt_ids for r in batch], [r.output_ids for r in batch], temperature=0.9)
    assert scored[0].requires_grad
    for r, lp in zip(batch, scored):
        assert lp.tolist() == r.output_logprobs


# ------------------------------------------------------------------------------------- weight sync
def test_weight_sync_of_experts(moe_dir, hf_moe):
    """An HF model's state dict (fused in-memory expert names) and per-expert checkpoint names both sync; the
    engine then equals HF's forward under the new weights. A mis-shaped expert is refused before any copy."""
    from parity.models.weights import WeightError

    engine = Engine.from_pretrained(moe_dir, dtype="fp32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf.model.layers[0].mlp.experts.gate_up_proj.mul_(1.5)
        hf.model.layers[2].mlp.gate.weight.copy_(torch.randn_like(hf.model.layers[2].mlp.gate.weight))
    assert "model.layers.0.mlp.experts.gate_up_proj" in hf.state_dict()
    engine.update_weights(hf)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    r = engine.generate(PROMPTS[1:], greedy)[0]
    ref_logp, ref_argmax = hf_logprobs(hf, r.prompt_ids, r.output_ids)
    assert r.output_ids == ref_argmax.tolist()
    torch.testing.assert_close(torch.tensor(r.output_logprobs), ref_logp, atol=1e-4, rtol=0)

    # per-expert checkpoint names, partial: expert 3's down projection of layer 2 only
    down = torch.randn(64, 32)
    engine.update_weights([("model.layers.2.mlp.experts.3.down_proj.weight", down)], partial=True)
    assert torch.equal(engine.model.layers[2].mlp.experts.down_proj[3], down)
    with torch.no_grad():
        hf.model.layers[2].mlp.experts.down_proj[3].copy_(down)
    r = engine.generate(PROMPTS[1:], greedy)[0]
    ref_logp, _ = hf_logprobs(hf, r.prompt_ids, r.output_ids)
    torch.testing.assert_close(torch.tensor(r.output_logprobs), ref_logp, atol=1e-4, rtol=0)

    with pytest.raises(WeightError, match="experts.1.up_proj.weight.*shape"):
        engine.update_weights([("model.layers.0.mlp.experts.1.up_proj.weight", torch.zeros(3, 3))], partial=True)


# --------------------------------------------------------------------------------- routing replay
ROUTED = SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True, seed=5, return_routed_experts=True)


@pytest.fixture(scope="module")
def routed_rollouts(det_engine):
    return det_engine.generate(PROMPTS + ["What is 12 + 34? The answer is"], ROUTED)


def test_routed_experts_are_the_engines_choice(moe_dir, det_engine, routed_rollouts):
    """int16 [prompt + output - 1, MoE layers, k], equal to the trainer's own routing when nothing differs; the
    same with chunked prefill; refused for a dense model."""
    from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

    trainer = parity_model_from_engine(det_engine, trainable=False)
    for r in routed_rollouts:
        assert r.routed_experts.dtype == torch.int16
        assert tuple(r.routed_experts.shape) == (len(r.prompt_ids) + len(r.output_ids) - 1, 2, 2)
        with trainer.routing.recording() as rec:
            token_logprobs(trainer, [r.prompt_ids], [r.output_ids], temperature=0.9)
        assert torch.equal(rec.routed_experts(), r.routed_experts)
    assert all(r.routed_experts is None for r in det_engine.generate(PROMPTS[:1], SAMPLED))
    chunked = Engine.from_pretrained(moe_dir, dtype="fp32", device="cpu", deterministic=True,
                                     max_num_batched_tokens=5, block_size=4)
    again = chunked.generate([routed_rollouts[1].prompt_ids], ROUTED)[0]
    assert torch.equal(again.routed_experts, routed_rollouts[1].routed_experts)


def test_dense_model_refuses_return_routed_experts(model_dirs):
    engine = Engine.from_pretrained(model_dirs["qwen3"], dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="return_routed_experts=True needs a mixture-of-experts model"):
        engine.generate(PROMPTS[:1], SamplingParams(max_tokens=2, return_routed_experts=True))


def test_replay_reproduces_rollout_logprobs_when_trainer_routes_differently(det_engine, routed_rollouts):
    """Unperturbed, replay is bitwise the rollout. With a router changed so that its own top-k differs from
    the rollout's, the trainer's logprobs move; replaying the rollout's experts gives them back."""
    from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

    prompts, outputs = [r.prompt_ids for r in routed_rollouts], [r.output_ids for r in routed_rollouts]
    routed = [r.routed_experts for r in routed_rollouts]
    rollout_lp = torch.tensor(sum((r.output_logprobs for r in routed_rollouts), []))
    trainer = parity_model_from_engine(det_engine)
    replayed = torch.cat(token_logprobs(trainer, prompts, outputs, temperature=0.9, routed_experts=routed))
    assert replayed.tolist() == rollout_lp.tolist()

    with torch.no_grad():
        e, delta = rerouting_delta(trainer, routed_rollouts)
        trainer.layers[trainer.config.moe_layers[0]].mlp.gate.weight[e] += delta
        with trainer.routing.recording() as rec:
            own = torch.cat(token_logprobs(trainer, prompts, outputs, temperature=0.9))
        replayed = torch.cat(token_logprobs(trainer, prompts, outputs, temperature=0.9, routed_experts=routed))
    own_layer0 = rec.routed_experts()[:, 0].sort(-1).values
    assert (own_layer0 != torch.cat(routed)[:, 0].sort(-1).values).any(), "the trainer's routing did not change"
    assert (own - rollout_lp).abs().max() > 1e-2
    torch.testing.assert_close(replayed, rollout_lp, atol=1e-4, rtol=0)


def test_hf_trainer_logprobs_replay(moe_dir, det_engine, routed_rollouts):
    """trainer_logprobs on an HF Qwen3-MoE whose router picks other experts: its own routing moves the logprobs,
    replaying the engine's experts (a forward hook on each router) gives the rollout's back."""
    from parity.trainer.logprobs import trainer_logprobs
    from parity.trainer.parity_model import parity_model_from_engine

    hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0.9)
    err = lambda t: (t.logprobs - t.rollout_logprobs)[t.mask].abs().max()
    assert err(trainer_logprobs(hf, routed_rollouts, params, replay_routing=True)) < 1e-4
    with torch.no_grad():
        e, delta = rerouting_delta(parity_model_from_engine(det_engine, trainable=False), routed_rollouts)
        hf.model.layers[det_engine.model.config.moe_layers[0]].mlp.gate.weight[e] += delta
    assert err(trainer_logprobs(hf, routed_rollouts, params)) > 1e-2
    assert err(trainer_logprobs(hf, routed_rollouts, params, replay_routing=True)) < 1e-4


def test_routed_experts_of_the_wrong_shape_are_refused_naming_the_rollout(moe_dir, det_engine, routed_rollouts):
    """Both replay paths (parity's forward and the HF router hook) check the rows, and the HF path the layers and
    k too, before any forward."""
    from dataclasses import replace

    from parity.trainer.logprobs import trainer_logprobs
    from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

    r = routed_rollouts[1]
    short = r.routed_experts[:-1]
    trainer = parity_model_from_engine(det_engine, trainable=False)
    with pytest.raises(ValueError, match=r"sequence 0: routed_experts has shape .*expected \d+ rows"):
        token_logprobs(trainer, [r.prompt_ids], [r.output_ids], routed_experts=[short])
    hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    for bad in (None, short, r.routed_experts[:, :1]):
        with pytest.raises(ValueError, match="rollout 1: routed_experts has shape"):
            trainer_logprobs(hf, [routed_rollouts[0], replace(r, routed_experts=bad)], replay_routing=True)


# ------------------------------------------------------------------------ Triton kernels (interpreter)
@pytest.fixture(scope="module")
def triton_moe():
    pytest.importorskip("triton")
    from parity.kernels.triton import moe

    return moe


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(*tensors, dtype=None):
    return [t.to(device=KERNEL_DEVICE, dtype=dtype or t.dtype) for t in tensors]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_route_equals_reference(triton_moe, renormalize, dtype):
    _, _, _, logits, k = _moe_inputs(num_tokens=11, experts=12, dtype=torch.float32)
    (logits,) = _on_device(logits, dtype=dtype)
    weights, ids = triton_moe.moe_route(logits, 3, renormalize)
    ref_w, ref_ids = reference.moe_route(logits, 3, renormalize)
    assert torch.equal(ids, ref_ids) and weights.dtype == ref_w.dtype
    torch.testing.assert_close(weights.float(), ref_w.float(), atol=1e-6 if dtype == torch.float32 else 8e-3, rtol=0)


def test_triton_align_tiles_hold_one_expert_each(triton_moe):
    ids = torch.randint(0, 5, (9, 2), generator=torch.Generator().manual_seed(3))
    pairs, tile_expert = triton_moe.moe_align(ids, 5, block_m=4)
    pairs, tile_expert, flat = pairs.cpu(), tile_expert.cpu(), ids.reshape(-1)
    real = pairs[pairs < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # every pair exactly once
    for tile, expert in enumerate(tile_expert.tolist()):
        in_tile = pairs[tile * 4 : tile * 4 + 4]
        in_tile = in_tile[in_tile < flat.numel()]
        if expert == 5:
            assert in_tile.numel() == 0
        else:
            assert (flat[in_tile] == expert).all() and in_tile.tolist() == sorted(in_tile.tolist())
    assert torch.equal(flat[real], torch.sort(flat, stable=True).values)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_fused_moe_equals_float64_reference(triton_moe, dtype, tol):
    x, gate_up, down, logits, k = _moe_inputs(num_tokens=21, hidden=40, inter=24, experts=6, dtype=torch.float64)
    weights, ids = reference.moe_route(logits, k, True)
    want = reference.fused_moe(x, gate_up, down, weights, ids)
    out = triton_moe.fused_moe(*_on_device(x, gate_up, down, weights, dtype=dtype), ids.to(KERNEL_DEVICE))
    assert out.dtype == dtype
    assert ((out.double().cpu() - want).norm() / want.norm()).item() < tol


def test_triton_fused_moe_is_batch_invariant_and_its_autograd_forward_equal(triton_moe):
    """A token's output is the same bits alone, in a batch, and in the autograd wrapper; the wrapper's gradients
    equal autograd through the reference."""
    x, gate_up, down, logits, k = _moe_inputs(num_tokens=19, hidden=40, inter=24, experts=6, dtype=torch.float32)
    weights, ids = reference.moe_route(logits, k, True)
    x, gate_up, down, weights, ids = _on_device(x, gate_up, down, weights, ids)
    full = triton_moe.fused_moe(x, gate_up, down, weights, ids)
    for rows in (slice(4, 5), slice(2, 9)):
        assert torch.equal(triton_moe.fused_moe(x[rows], gate_up, down, weights[rows], ids[rows]), full[rows])
    leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    out = triton_moe.fused_moe_autograd(*leaves, ids)
    assert torch.equal(out, full)
    out.square().sum().backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    reference.fused_moe(*ref_leaves, ids).square().sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels run in the other tests")
def test_engine_on_triton_moe_kernels_in_the_interpreter(tmp_path, monkeypatch, triton_moe):
    """The whole engine on the Triton kernels (interpreted, CPU tensors), one MoE layer: fast mode's greedy tokens
    and logprobs equal HF's (fp32, 1e-4); deterministic mode alone == in a batch with chunked prefill == the
    trainer's parity forward with autograd, bit for bit."""
    from parity.kernels import dispatch
    from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

    path = write_tiny_moe(tmp_path / "m", mlp_only_layers=(), hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, num_experts=4)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    monkeypatch.setattr(dispatch, "device_kind", lambda x: "cuda")
    options = dict(dtype="fp32", max_model_len=128, max_num_batched_tokens=8, kv_cache_memory=1 << 20)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (4, 13)]
    fast = Engine.from_pretrained(str(path), **options)
    r = fast.generate(prompts[1:], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    ref_logp, ref_argmax = hf_logprobs(hf, r.prompt_ids, r.output_ids)
    assert r.output_ids == ref_argmax.tolist()
    torch.testing.assert_close(torch.tensor(r.output_logprobs), ref_logp, atol=1e-4, rtol=0)

    engine = Engine.from_pretrained(str(path), deterministic=True, **options)
    params = SamplingParams(temperature=0.8, max_tokens=3, seed=3, ignore_eos=True)
    batch = engine.generate(prompts, params)
    alone = engine.generate([prompts[1]], params)[0]
    assert alone.output_ids == batch[1].output_ids and alone.output_logprobs == batch[1].output_logprobs
    scored = token_logprobs(parity_model_from_engine(engine), prompts, [r.output_ids for r in batch], temperature=0.8)
    assert scored[0].requires_grad
    for r, lp in zip(batch, scored):
        assert lp.tolist() == r.output_logprobs
