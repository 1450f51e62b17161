"""In-process weight sync: trainer weights changed by an optimizer step reach the engine in place;
a bad update is refused whole; every source form (module, wrappers, DTensor, state dict, iterator) works."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from spawn_ranks import free_port
from transformers import AutoModelForCausalLM

from parity import Engine, SamplingParams
from parity.engine.weight_sync import _all_finite
from parity.models.weights import WeightError
from parity.trainer.logprobs import trainer_logprobs

PROMPTS = ["What is 3 + 4?", "Sort the list 5 3 9 1", "Hello"]
PARAMS = SamplingParams(n=2, temperature=0.9, top_k=50, max_tokens=12, seed=7, raw_logprobs=True)


def make_engine(model_dir: str, device: str = "cpu", **kw) -> Engine:
    return Engine.from_pretrained(model_dir, device=device, kv_cache_memory=1 << 21, max_model_len=128, **kw)


def hf_raw_logprobs(model, rollout) -> torch.Tensor:
    """Independent reference: teacher-forced full-softmax logprobs of the response, one sequence at a time."""
    ids = torch.tensor([rollout.prompt_ids + rollout.output_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)[len(rollout.prompt_ids) - 1 : -1]
    return logp.gather(1, torch.tensor(rollout.output_ids)[:, None])[:, 0]


def optimizer_step(model, rollouts) -> None:
    """One Adam step of next-token loss on the rollouts' own tokens: moves every weight."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    ids = torch.tensor([r.prompt_ids + r.output_ids for r in rollouts[:1]])
    model(ids, labels=ids).loss.backward()
    opt.step()


def engine_state(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def test_update_after_optimizer_step_matches_trainer(model_dirs):
    model_dir = model_dirs["qwen2"]  # q/k/v biases exercise the fused-bias slices
    engine = make_engine(model_dir, dtype="fp32")
    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = engine.generate(PROMPTS, PARAMS)
    for r in before:
        assert r.weight_version == 0
        torch.testing.assert_close(torch.tensor(r.output_raw_logprobs), hf_raw_logprobs(trainer, r), atol=1e-4, rtol=0)

    old_trainer = copy.deepcopy(trainer)
    optimizer_step(trainer, before)
    stats = engine.update_weights(trainer)
    assert stats.weight_version == engine.weight_version == 1
    assert stats.num_tensors == len(engine.weights.targets)
    assert stats.bytes_copied == sum(p.numel() * 4 for p in engine.model.parameters())
    assert engine.scheduler.block_manager.cached == {}  # prefixes computed with old weights are gone

    after = engine.generate(PROMPTS, PARAMS)
    max_shift = 0.0
    for r in after:
        assert r.weight_version == 1
        engine_lp = torch.tensor(r.output_raw_logprobs)
        torch.testing.assert_close(engine_lp, hf_raw_logprobs(trainer, r), atol=1e-4, rtol=0)
        max_shift = max(max_shift, (engine_lp - hf_raw_logprobs(old_trainer, r)).abs().max().item())
    assert max_shift > 1e-2, "the update did not change the engine's logprobs"

    # The trainer-side batch recomputation (padded, temperature + top-k as sampled; greedy at T = 1) agrees too.
    greedy = SamplingParams(temperature=0, max_tokens=6)
    for rollouts, params, mode in [(after, PARAMS, "processed"), (after, PARAMS, "raw"),
                                   (engine.generate(PROMPTS, greedy), greedy, "processed")]:
        out = trainer_logprobs(trainer, rollouts, params, mode=mode)
        assert out.mask.sum() == sum(len(r.output_ids) for r in rollouts)
        torch.testing.assert_close(out.logprobs[out.mask], out.rollout_logprobs[out.mask], atol=1e-4, rtol=0)


def test_bf16_engine_receives_rounded_fp32_weights(llama_dir):
    engine = make_engine(llama_dir, dtype="bf16")
    trainer = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        trainer.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    stats = engine.update_weights(trainer.state_dict())
    assert stats.bytes_copied == sum(p.numel() * 2 for p in engine.model.parameters())
    inter = trainer.config.intermediate_size
    fused = engine.model.layers[1].mlp.gate_up_proj.weight
    assert fused.dtype == torch.bfloat16
    assert torch.equal(fused[inter:], trainer.model.layers[1].mlp.up_proj.weight.to(torch.bfloat16))
    assert torch.equal(engine.model.embed_tokens, trainer.model.embed_tokens.weight.to(torch.bfloat16))


@pytest.mark.parametrize("where", ["shape", "missing", "unexpected", "dtype", "bool", "meta", "nan", "inf"])
def test_bad_update_is_refused_whole(llama_dir, where):
    engine = make_engine(llama_dir, dtype="fp32")
    params = SamplingParams(temperature=0, max_tokens=8, raw_logprobs=True)
    reference = engine.generate(PROMPTS, params)
    state_before = engine_state(engine)
    cached_before = dict(engine.scheduler.block_manager.cached)
    assert cached_before  # the prompts left cached prefixes, which a refused update must keep
    trainer = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    # Every good tensor is scaled, and the bad entry comes last: a copy-as-you-go loader would have
    # changed the engine before noticing.
    source = {k: v * 2.0 for k, v in trainer.state_dict().items()}
    last = "model.layers.1.mlp.down_proj.weight"
    good = source.pop(last)
    if where == "shape":
        source[last] = torch.zeros(good.shape[0], good.shape[1] + 1)
    elif where == "unexpected":
        source[last] = good
        source["model.layers.2.mlp.down_proj.weight"] = good
    elif where == "dtype":
        source[last] = good.to(torch.int32)
    elif where == "bool":
        source[last] = good > 0
    elif where == "meta":
        source[last] = torch.empty(good.shape, device="meta")
    elif where in ("nan", "inf"):
        source[last] = good.clone()
        source[last][3, 5] = float(where)
    with pytest.raises(WeightError) as err:
        engine.update_weights(source)
    expected = {"shape": "has shape", "missing": "missing tensor", "unexpected": "unexpected tensor", "dtype": "dtype",
                "bool": "torch.bool", "meta": "meta device", "nan": "inf or nan", "inf": "inf or nan"}
    assert expected[where] in str(err.value) and ("down_proj" in str(err.value))
    with pytest.raises(WeightError):  # the same through a one-shot iterator
        engine.update_weights(iter(source.items()))
    assert engine.weight_version == 0
    assert engine.scheduler.block_manager.cached == cached_before
    for k, v in engine_state(engine).items():
        assert torch.equal(v, state_before[k]), k
    again = engine.generate(PROMPTS, params)
    assert [r.output_ids for r in again] == [r.output_ids for r in reference]
    assert [r.output_logprobs for r in again] == [r.output_logprobs for r in reference]


def test_finite_check_on_the_engine_device_gives_the_plain_verdicts():
    """Host tensors checked on a given device (here the CPU, where a CPU engine checks them) get the verdicts
    of isfinite over the tensors themselves, for every float dtype, a strided view and an empty tensor."""
    finite = torch.randn(5, 7)
    with_nan = finite.clone().to(torch.bfloat16)
    with_nan[2, 3] = float("nan")
    fp16_max = torch.full((4,), torch.finfo(torch.float16).max, dtype=torch.float16)
    with_inf = fp16_max.clone()
    with_inf[1] = float("inf")
    strided = finite.clone()
    strided[4, 6] = -float("inf")
    tensors = [finite, with_nan, fp16_max, with_inf, strided.t()[::2], strided.t()[1::2], torch.empty(0, 3),
               finite.double()]
    expected = [True, False, True, False, False, True, True, True]
    assert [bool(torch.isfinite(t).all()) for t in tensors] == expected
    assert _all_finite(tensors, torch.device("cpu")) == expected


@pytest.mark.gpu
def test_host_tensors_into_a_cuda_engine_are_checked_on_the_gpu(llama_dir, monkeypatch):
    """A trainer's CPU tensors into a CUDA engine: the inf/nan check reads them on the engine's GPU, a nan
    (in the last tensor) is still refused before anything is copied, and a good update lands rounded."""
    engine = make_engine(llama_dir, device="cuda", dtype="bf16")
    trainer = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    source = {k: v * 2.0 for k, v in trainer.state_dict().items()}
    assert all(t.device.type == "cpu" for t in source.values())
    last = "model.layers.1.mlp.down_proj.weight"
    bad = dict(source)
    bad[last] = source[last].clone()
    bad[last][3, 5] = float("nan")
    state_before = engine_state(engine)
    checked_on: list[str] = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: checked_on.append(t.device.type) or isfinite(t))
    with pytest.raises(WeightError, match="inf or nan"):
        engine.update_weights(bad)
    assert checked_on and set(checked_on) == {"cuda"}
    assert engine.weight_version == 0
    for k, v in engine_state(engine).items():
        assert torch.equal(v, state_before[k]), k

    stats = engine.update_weights(source)
    assert stats.weight_version == engine.weight_version == 1
    inter = trainer.config.intermediate_size
    fused = engine.model.layers[1].mlp.gate_up_proj.weight
    assert torch.equal(fused[inter:].cpu(), source["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16))
    assert torch.equal(engine.model.layers[1].mlp.down_proj.weight.cpu(), source[last].to(torch.bfloat16))


def test_update_refused_with_requests_in_flight(llama_dir):
    engine = make_engine(llama_dir, dtype="fp32")
    trainer = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with pytest.raises(TypeError, match="nn.Module, a state dict"):
        engine.update_weights(42)
    engine.add_request("Hello", SamplingParams(max_tokens=4))
    engine.step()
    with pytest.raises(RuntimeError, match="in flight"):
        engine.update_weights(trainer)


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_every_source_form_gives_the_same_weights(llama_dir, process_group):
    """Module, DDP wrapper, FSDP2 (DTensor parameters), state dict, (name, tensor) iterator."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    engine = make_engine(llama_dir, dtype="fp32")
    trainer = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.update_weights(trainer)
    expected = engine_state(engine)

    sharded = copy.deepcopy(trainer)
    fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
    assert any(type(t).__name__ == "DTensor" for t in sharded.state_dict().values())
    sources = {
        "ddp": DistributedDataParallel(copy.deepcopy(trainer)),
        "fsdp2": sharded,
        "compiled-name prefix": {f"_orig_mod.{k}": v for k, v in trainer.state_dict().items()},
        "iterator": trainer.named_parameters(),
    }
    for name, source in sources.items():
        engine.update_weights({k: torch.zeros_like(v) for k, v in trainer.state_dict().items()})
        stats = engine.update_weights(source)
        assert stats.num_gathered == (len(engine.weights.targets) if name == "fsdp2" else 0), name
        for k, v in engine_state(engine).items():
            assert torch.equal(v, expected[k]), (name, k)


def test_sync_from_parity_trainer_model(llama_dir):
    """parity's own trainer model (DecoderModel, fused layout) as the source, and as the scorer."""
    from parity.trainer.parity_model import parity_model_from_engine

    engine = make_engine(llama_dir, dtype="fp32")
    trainer = parity_model_from_engine(engine)
    before = engine.generate(PROMPTS, PARAMS)
    opt = torch.optim.Adam(trainer.parameters(), lr=3e-2)
    logp = trainer_logprobs(trainer, before, PARAMS, with_grad=True)
    (-(logp.logprobs * logp.mask).sum()).backward()
    opt.step()
    engine.update_weights(trainer)
    for name, p in trainer.named_parameters():
        assert torch.equal(dict(engine.model.named_parameters())[name], p.detach()), name
    after = engine.generate(PROMPTS, PARAMS)
    out = trainer_logprobs(trainer, after, PARAMS)
    torch.testing.assert_close(out.logprobs[out.mask], out.rollout_logprobs[out.mask], atol=1e-4, rtol=0)
    stale = trainer_logprobs(trainer, before, PARAMS)
    assert (stale.logprobs - stale.rollout_logprobs)[stale.mask].abs().max() > 1e-2



def test_trainer_logprobs_fp32_head_under_autocast(llama_dir):
    """Under bf16 autocast, logits_fp32 runs the LM head in float32 on the model's final hidden states."""
    engine = make_engine(llama_dir, dtype="fp32")
    trainer = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    rollouts = engine.generate(PROMPTS, PARAMS)
    captured = {}
    trainer.model.norm.register_forward_hook(lambda module, args, out: captured.__setitem__("hidden", out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_head = trainer_logprobs(trainer, rollouts, None, logits_fp32=True, with_grad=True)
        hidden = captured["hidden"].detach()
        bf16_head = trainer_logprobs(trainer, rollouts, None, logits_fp32=False)
    assert fp32_head.logprobs.requires_grad
    # Reference: response rows of the final hidden states (prompts are left-padded, so the last T+1
    # columns), times the float32 LM head, full softmax at temperature 1.
    m = fp32_head.mask
    width = m.shape[1]
    logits = hidden[:, -(width + 1) : -1].float() @ trainer.lm_head.weight.float().T
    targets = torch.tensor([r.output_ids + [0] * (width - len(r.output_ids)) for r in rollouts])
    ref = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(fp32_head.logprobs.detach()[m], ref[m], atol=1e-5, rtol=0)
    assert (bf16_head.logprobs - ref)[m].abs().max() > 1e-3  # a bf16 head rounds visibly
