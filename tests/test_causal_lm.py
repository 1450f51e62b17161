"""ParityForCausalLM, parity's decoder behind an HF causal-LM interface, against HF transformers itself:
forward (with padding) and loss, one AdamW step, save_pretrained read back by transformers and by the
engine, gradient checkpointing, and FSDP2 over 2 gloo processes (bit for bit in deterministic mode);
float32 master weights for a bf16 model; `parity train` with trainer.model=parity (mismatch exactly 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spawn_ranks import run_ranks
from transformers import AutoModelForCausalLM, AutoTokenizer

from parity import Engine, SamplingParams
from parity.precision.policy import PrecisionPolicy
from parity.train.config import load_train_config
from parity.train.grpo import run_grpo
from parity.trainer.causal_lm import ParityForCausalLM
from parity.trainer.logprobs import trainer_logprobs
from parity.trainer.master_weights import MasterWeightAdamW
from parity.trainer.parity_model import token_logprobs

FAST_FP32 = PrecisionPolicy("fp32", deterministic=False)
EXACT_FP32 = PrecisionPolicy("fp32", deterministic=True)


def padded_batch(vocab_size: int, seed: int = 0):
    """Token ids [3, 10]: one full row, one left-padded by 3, one right-padded by 4; mask and HF labels
    (labels count where the token and the one before it are real, as ParityForCausalLM counts them)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, -4:] = 0
    real = mask.bool()
    counted = real & torch.cat([torch.zeros(3, 1, dtype=torch.bool), real[:, :-1]], dim=1)
    return ids, mask, torch.where(counted, ids, -100)


def hf_model(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_forward_and_loss_match_hf_with_padding(model_dirs, arch):
    ours = ParityForCausalLM.from_pretrained(model_dirs[arch], FAST_FP32, device="cpu")
    hf = hf_model(model_dirs[arch])
    ids, mask, labels = padded_batch(ours.config.vocab_size)
    got = ours(ids, attention_mask=mask, labels=ids)
    want = hf(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], want.logits[real], rtol=1e-5, atol=1e-5)
    assert bool((got.logits[~real] == 0).all())  # padding is never computed on
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    # logits_to_keep: the last columns only, as HF returns them (the LM head then multiplies fewer rows: a CPU
    # matmul's sums may depend on the row count, so float32 closeness, not bits).
    tail = ours(ids, attention_mask=mask, logits_to_keep=3).logits
    assert tail.shape == (3, 3, ours.config.vocab_size)
    torch.testing.assert_close(tail, got.logits[:, -3:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_mask=torch.zeros(2, 3)), "no real token"),
    (dict(position_ids=torch.full((2, 3), 5000)), "past the model's max_positions=1024"),
    (dict(labels=torch.zeros(2, 2, dtype=torch.long)), r"labels has shape \(2, 2\)"),
    (dict(use_cache=True), "no KV cache"),
])
def test_forward_refuses_bad_input_naming_it(model_dirs, kwargs, message):
    model = ParityForCausalLM.from_pretrained(model_dirs["llama"], FAST_FP32, device="cpu")
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(2, 3, dtype=torch.long), **kwargs)


def test_one_adamw_step_matches_hf(model_dirs):
    """Llama: Adam's first step is g / (|g| + eps) per weight, which turns float32 rounding of a near-zero
    gradient into a visible step difference; Qwen3's q/k norms make many q_proj gradients near zero."""
    ours = ParityForCausalLM.from_pretrained(model_dirs["llama"], FAST_FP32, device="cpu")
    hf = hf_model(model_dirs["llama"])
    before = ours.hf_state_dict()
    ids, mask, labels = padded_batch(ours.config.vocab_size, seed=1)
    for model, lab in ((ours, ids), (hf, labels)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        model(input_ids=ids, attention_mask=mask, labels=lab).loss.backward()
        opt.step()
    after, after_hf = ours.hf_state_dict(), hf.state_dict()
    assert after.keys() <= after_hf.keys()
    for name, tensor in after.items():
        # Each weight moved by ~lr = 1e-3; the two steps agree to float32 rounding of that.
        torch.testing.assert_close(tensor, after_hf[name], rtol=1e-5, atol=2e-6, msg=name)
    assert max(float((after[n] - before[n]).abs().max()) for n in after) > 5e-4  # the step moved the weights


def test_accelerate_bf16_autocast_runs_it_like_an_hf_model(model_dirs):
    """accelerate's mixed precision (bf16 autocast around forward, float32 weights and gradients)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    ours = accelerator.prepare(ParityForCausalLM.from_pretrained(model_dirs["llama"], FAST_FP32, device="cpu"))
    hf = accelerator.prepare(hf_model(model_dirs["llama"]))
    ids, mask, labels = padded_batch(ours.config.vocab_size, seed=8)
    got = ours(input_ids=ids, attention_mask=mask, labels=ids)
    want = hf(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        full = ParityForCausalLM.from_pretrained(model_dirs["llama"], FAST_FP32, device="cpu")(ids, attention_mask=mask)
    real = mask.bool()
    assert float((got.logits.detach()[real] - full.logits[real]).abs().max()) > 1e-4  # the matmuls ran in bf16
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-2, atol=0)  # bf16 roundings in different places
    accelerator.backward(got.loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())
    AcceleratorState._reset_state(reset_partial_state=True)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model_dirs):
    model = ParityForCausalLM.from_pretrained(model_dirs["llama"], FAST_FP32, device="cpu")
    ids, mask, _ = padded_batch(model.config.vocab_size, seed=2)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ckpt_loss, ckpt_grads = loss_and_grads()
    model.gradient_checkpointing_disable()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(-t.numel()) or t, lambda t: t):
        loss_and_grads()
    assert not model.is_gradient_checkpointing
    assert torch.equal(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        assert torch.equal(ckpt_grads[name], grad), name
    kept_with = sum(n for n in saved if n > 0)
    kept_without = -sum(n for n in saved if n < 0)
    assert kept_with < kept_without  # checkpointing keeps fewer activations for backward


def test_save_pretrained_loads_in_hf_and_in_the_engine(model_dirs, tmp_path):
    src = model_dirs["qwen2"]
    model = ParityForCausalLM.from_pretrained(src, EXACT_FP32, device="cpu", max_positions=64)
    with torch.no_grad():  # a trained model: every weight moved
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    out = model.save_pretrained(tmp_path / "saved", max_shard_size="100KB")
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file()  # sharded as asked

    hf = hf_model(str(out))
    hf_state = hf.state_dict()
    assert all(torch.equal(hf_state[name], t) for name, t in model.hf_state_dict().items())  # every weight, exactly
    ids, mask, _ = padded_batch(model.config.vocab_size, seed=4)
    real = mask.bool()
    torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits[real],
                               model(ids, attention_mask=mask).logits[real], rtol=1e-5, atol=1e-4)

    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    kw = dict(device="cpu", dtype="fp32", deterministic=True, max_model_len=64, kv_cache_memory=1 << 20)
    loaded = Engine.from_pretrained(out, **kw).generate(["Hello", "What is 12 + 34?"], params)
    synced_engine = Engine.from_pretrained(src, **kw)
    synced_engine.update_weights(model.model)  # by reference: HF-named views of the fused parameters
    synced = synced_engine.generate(["Hello", "What is 12 + 34?"], params)
    assert [r.output_ids for r in loaded] == [r.output_ids for r in synced]
    assert [r.output_logprobs for r in loaded] == [r.output_logprobs for r in synced]
    scored = token_logprobs(model.model, [r.prompt_ids for r in loaded], [r.output_ids for r in loaded])
    for r, lp in zip(loaded, scored):
        assert lp.tolist() == r.output_logprobs  # deterministic mode: the trainer's logprob is the engine's
    aligned = trainer_logprobs(model, loaded, params)  # the wrapper itself goes the same way
    assert torch.equal(aligned.logprobs, aligned.rollout_logprobs)


# -------------------------------------------------------------------------------------- FSDP2
def _fsdp_worker(rank: int, model_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    ids, mask, _ = padded_batch(384, seed=6)
    out = {}
    for dtype in ("fp32", "bf16"):
        model = ParityForCausalLM.from_pretrained(model_dir, PrecisionPolicy(dtype, deterministic=True), device="cpu")
        model.fully_shard(mesh=mesh)
        with torch.no_grad():
            out[dtype] = model(ids[:, :6] % model.config.vocab_size, attention_mask=mask[:, :6]).logits
        out[f"{dtype}_saved"] = model.hf_state_dict()  # gathered from both shards
    out["trained"] = _sgd_step(ParityForCausalLM.from_pretrained(model_dir, FAST_FP32, device="cpu"), [rank], mesh)
    return out


def _sgd_step(model: ParityForCausalLM, seeds: list[int], mesh=None) -> dict[str, torch.Tensor]:
    """One SGD step with gradient checkpointing on the mean loss of `seeds`' batches (FSDP: this rank's batch;
    it averages the gradients over the ranks). The HF-named weights after it."""
    model.gradient_checkpointing_enable()
    if mesh is not None:
        model.fully_shard(mesh=mesh)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for seed in seeds:
        ids, mask, _ = padded_batch(model.config.vocab_size, seed=10 + seed)
        losses.append(model(ids, attention_mask=mask, labels=ids).loss)
    (sum(losses) / len(losses)).backward()
    opt.step()
    return model.hf_state_dict()


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_bit_for_bit(llama_dir, tmp_path):
    """Forward (deterministic, fp32 and bf16 with float32 master weights): bit for bit. A training step: to rounding."""
    ranks = run_ranks(_fsdp_worker, 2, tmp_path, llama_dir)
    ids, mask, _ = padded_batch(384, seed=6)
    for dtype in ("fp32", "bf16"):
        single = ParityForCausalLM.from_pretrained(llama_dir, PrecisionPolicy(dtype, deterministic=True), device="cpu")
        with torch.no_grad():
            want = single(ids[:, :6] % single.config.vocab_size, attention_mask=mask[:, :6]).logits
        state = single.hf_state_dict()
        for r in ranks:
            assert torch.equal(r[dtype], want), dtype
            assert r[f"{dtype}_saved"].keys() == state.keys()
            assert all(torch.equal(r[f"{dtype}_saved"][k], v) for k, v in state.items())
    # Training under FSDP2 (gradient checkpointing on): one step equals one process's on both ranks' batches.
    initial = ParityForCausalLM.from_pretrained(llama_dir, FAST_FP32, device="cpu").hf_state_dict()
    trained = _sgd_step(ParityForCausalLM.from_pretrained(llama_dir, FAST_FP32, device="cpu"), [0, 1])
    for r in ranks:
        for name, tensor in trained.items():
            torch.testing.assert_close(r["trained"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert max(float((trained[n] - initial[n]).abs().max()) for n in trained) > 1e-3  # the step moved the weights


# ------------------------------------------------------------------------------ master weights
def test_master_weight_adamw_keeps_float32_updates_of_a_bf16_model():
    """Small Adam steps on bf16 weights: the float32 masters follow float32 AdamW exactly, the model holds
    them rounded; plain bf16 AdamW would lose every step below bf16's resolution."""
    gen = torch.Generator().manual_seed(7)
    start = torch.randn(64, 32, generator=gen)
    model = torch.nn.Linear(32, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(start)
    reference = start.to(torch.bfloat16).float().requires_grad_(True)  # float32 AdamW on the same values
    opt = MasterWeightAdamW(model.parameters(), lr=1e-5)
    ref_opt = torch.optim.AdamW([reference], lr=1e-5)
    for _ in range(5):
        x = torch.randn(8, 32, generator=gen).to(torch.bfloat16)
        model(x).float().square().mean().backward()
        assert model.weight.grad is None  # moved into the master at once
        reference.grad = opt.master_params[0].grad.clone()
        torch.nn.utils.clip_grad_norm_(opt.master_params, 1.0)
        torch.nn.utils.clip_grad_norm_([reference], 1.0)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert torch.equal(opt.master_params[0], reference.detach())
    assert torch.equal(model.weight.detach(), reference.detach().to(torch.bfloat16))
    assert not torch.equal(reference.detach(), start.to(torch.bfloat16).float())  # the masters moved
    # ~5e-5 in total: below half a bf16 ulp for most weights, so most bf16 weights did not change at all.
    assert float((model.weight.detach().float() == start.to(torch.bfloat16).float()).float().mean()) > 0.5


# -------------------------------------------------------------------------------- parity train
EXACT_CONFIG = Path(__file__).parent.parent / "configs" / "grpo_tiny_arith_exact.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_exact_grpo_mismatch_is_zero_at_every_step(tmp_path, dtype):
    """trainer.model=parity with the deterministic engine: the trainer's logprobs are the rollout's, bit for
    bit, at every step and after every weight sync, while the weights really train."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_train_config(EXACT_CONFIG, [
            f"out_dir={tmp_path}", "steps=2", "rollout.prompts_per_step=8", "warmstart.steps=10",
            "warmstart.batch_size=8", "tracking.mode=disabled", f"engine.dtype={dtype}",
            f"optim.mixed_precision={dtype}",
        ])
        result = run_grpo(config, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(result.history) == 2
    for row in result.history:
        assert row["mismatch/logp_abs_diff_max"] == 0.0
        assert row["mismatch/mismatch_k3_kl"] == 0.0
        assert row["actor/grad_norm"] > 0  # rewards differ within groups: a real update every step
    assert [row["weight_version"] for row in result.history] == [2, 3]  # warm-start sync, then one per step


@pytest.mark.parametrize("overrides, message", [
    (["trainer.model=torch"], "trainer.model must be one of hf, parity"),
    (["engine.deterministic=false"], "set engine.deterministic=true"),
    (["engine.dtype=fp16", "optim.mixed_precision=fp16"], "needs loss scaling"),
    (["engine.dtype=bf16"], "set optim.mixed_precision=bf16"),
])
def test_parity_trainer_config_refusals(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(EXACT_CONFIG, overrides)


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, grad_rtol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_cuda_deterministic_training_forward_is_the_engines(model_dirs, dtype, grad_rtol):
    """On CUDA, deterministic mode under autograd (Triton forward, analytic backward): the logprobs that enter
    the loss are the engine's bit for bit; the gradients match fast mode's (autograd through torch ops)."""
    kw = dict(device="cuda", dtype=dtype, deterministic=True, max_model_len=64, kv_cache_memory=1 << 24)
    engine = Engine.from_pretrained(model_dirs["qwen3"], **kw)
    prompts = ["Hello", "What is 12 + 34?", "The quick brown fox"]
    rollouts = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=12, ignore_eos=True))
    grads = {}
    for mode, deterministic in (("exact", True), ("fast", False)):
        model = ParityForCausalLM.from_engine(engine, deterministic=deterministic)
        scored = token_logprobs(model.model, [r.prompt_ids for r in rollouts], [r.output_ids for r in rollouts])
        if deterministic:
            for r, lp in zip(rollouts, scored):
                assert lp.tolist() == r.output_logprobs
        torch.cat(scored).sum().backward()
        grads[mode] = {n: p.grad.float() for n, p in model.named_parameters()}
    for name, g in grads["fast"].items():
        err = float((grads["exact"][name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < grad_rtol, f"{name}: relative gradient difference {err:.2e}"
