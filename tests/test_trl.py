"""TRL's GRPOTrainer with parity as its rollout engine, on the real TRL (CPU, tiny model, 3 optimizer steps).

Checked against independent references: after every weight sync the engine's logprobs of a fixed completion
equal the trainer model's (HF transformers' forward, fp32); TRL's logged `sampling/...` metrics equal the ones
recomputed here from the completions and logprobs parity handed TRL and the HF model's own logprobs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from parity.integrations.trl import (  # noqa: E402
    ParityGRPOTrainer,
    ParityRolloutConfig,
    TRLIntegrationError,
    check_trl_version,
)
from parity.trainer.parity_model import token_logprobs  # noqa: E402

STEPS = 3
TEMPERATURE = 0.9
FIXED_PROMPT = "What is 12 + 34?"
FIXED_COMPLETION = " The answer is 46."


def length_reward(completions, **kwargs) -> list[float]:
    """Needs no network: longer answers score higher, so advantages are non-zero and weights move."""
    return [len(c[0]["content"]) / 10 for c in completions]


@pytest.fixture(scope="module")
def dataset():
    prompts = [[{"role": "user", "content": f"What is {i} + {i + 1}?"}] for i in range(16)]
    return datasets.Dataset.from_dict({"prompt": prompts})


def grpo_args(tmp_path, **overrides) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        max_steps=STEPS, logging_steps=1, report_to=[], use_cpu=True, learning_rate=5e-3, save_strategy="no",
        temperature=TEMPERATURE, vllm_importance_sampling_mode="token_truncate", seed=3, bf16=False,
    )
    return GRPOConfig(**{**base, **overrides})


def hf_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> torch.Tensor:
    """Reference: teacher-forced log-softmax(logits / T) of the completion under an HF model, fp32."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


class Recorder:
    """Observes the real trainer: right after each TRL-driven sync, the engine vs the trainer model on a fixed
    completion; at each generation, what parity handed TRL next to the HF model's logprobs of it."""

    def __init__(self, trainer, tokenizer):
        self.trainer, self.gen = trainer, trainer.vllm_generation
        self.prompt = tokenizer(FIXED_PROMPT)["input_ids"]
        self.completion = tokenizer(FIXED_COMPLETION)["input_ids"]
        self.syncs: list[dict] = []
        self.generations: list[dict] = []
        real_sync, real_generate = self.gen.sync_weights, self.gen.generate

        def sync_weights():
            stats = real_sync()
            engine_lp = token_logprobs(self.gen.engine.model, [self.prompt], [self.completion], TEMPERATURE)[0]
            trainer_lp = hf_logprobs(trainer.model, self.prompt, self.completion, TEMPERATURE)
            self.syncs.append({"step": trainer.state.global_step, "version": stats.weight_version,
                               "engine": engine_lp, "trainer": trainer_lp})
            return stats

        def generate(prompts, images, num_generations, profiler=None):
            out = real_generate(prompts, images, num_generations, profiler)
            prompt_ids, completion_ids, logprobs, _ = out
            parity_lp = torch.tensor([lp[0] for row in logprobs for lp in row])
            trainer_lp = torch.cat([hf_logprobs(trainer.model, p, c, TEMPERATURE)
                                    for p, c in zip(prompt_ids, completion_ids)])
            self.generations.append({"parity": parity_lp, "trainer": trainer_lp, "prompts": prompts,
                                     "prompt_ids": prompt_ids, "completion_ids": completion_ids})
            return out

        self.gen.sync_weights, self.gen.generate = sync_weights, generate


def train(model_dir, tmp_path, dataset, parity=None, **overrides):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = ParityGRPOTrainer(model=model, reward_funcs=length_reward, args=grpo_args(tmp_path, **overrides),
                                train_dataset=dataset, processing_class=tokenizer, parity=parity)
    recorder = Recorder(trainer, tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "sampling/sampling_logp_difference/mean" in h]
    return trainer, recorder, logs


@pytest.fixture(scope="module")
def fp32_run(llama_dir, tmp_path_factory, dataset):
    return train(llama_dir, tmp_path_factory.mktemp("fp32"), dataset)


def test_weights_synced_once_per_optimizer_step(fp32_run):
    trainer, rec, logs = fp32_run
    assert len(logs) == STEPS and trainer.state.global_step == STEPS
    assert [s["step"] for s in rec.syncs] == list(range(STEPS))  # one sync per optimizer step, before its rollout
    assert [s["version"] for s in rec.syncs] == list(range(1, STEPS + 1))
    for s in rec.syncs:  # the engine holds exactly the trainer's weights (fp32 rounding apart)
        torch.testing.assert_close(s["engine"], s["trainer"], rtol=0, atol=2e-5)
    moved = (rec.syncs[-1]["trainer"] - rec.syncs[0]["trainer"]).abs().max()
    assert moved > 1e-3, "the optimizer steps did not change the model, so the sync check proves nothing"


def test_completions_follow_trl_order_and_stop_on_trl_eos(fp32_run):
    trainer, rec, _ = fp32_run
    eos = set(trainer.eos_token_ids)
    for g in rec.generations:
        assert [list(p) for p in g["prompts"]] == g["prompt_ids"]  # one completion per prompt row, in order
        for ids in g["completion_ids"]:
            assert 1 <= len(ids) <= 8
            assert all(t not in eos for t in ids[:-1])  # generation stops at TRL's EOS set, EOS kept


def expected_sampling_metrics(parity_lp: torch.Tensor, trainer_lp: torch.Tensor, clip_max: float) -> dict:
    """TRL's token_truncate definitions, from the logprobs parity returned and the HF model's."""
    diff = trainer_lp - parity_lp
    ratio = diff.exp().clamp(max=clip_max)
    return {
        "sampling/sampling_logp_difference/mean": diff.abs().mean().item(),
        "sampling/sampling_logp_difference/max": diff.abs().max().item(),
        "sampling/importance_sampling_ratio/min": ratio.min().item(),
        "sampling/importance_sampling_ratio/mean": ratio.mean().item(),
        "sampling/importance_sampling_ratio/max": ratio.max().item(),
    }


def test_trl_sampling_metrics_come_from_parity_logprobs(llama_dir, tmp_path, dataset):
    """A bf16 engine under an fp32 trainer: a visible mismatch (~1e-2), which TRL's metrics must reproduce."""
    trainer, rec, logs = train(llama_dir, tmp_path, dataset, parity=ParityRolloutConfig(dtype="bf16"))
    assert trainer.engine.model.dtype == torch.bfloat16
    assert len(rec.generations) == len(logs) == STEPS
    for g, logged in zip(rec.generations, logs):
        expected = expected_sampling_metrics(g["parity"], g["trainer"], trainer.args.vllm_importance_sampling_clip_max)
        assert expected["sampling/sampling_logp_difference/mean"] > 1e-3  # bf16 rounding is visible
        for name, value in expected.items():
            assert math.isclose(logged[name], value, rel_tol=1e-3, abs_tol=2e-5), (name, logged[name], value)


def test_version_range():
    check_trl_version(trl.__version__)
    for version in ("0.23.0", "1.15.2", "2.0.0"):
        with pytest.raises(TRLIntegrationError, match=r"trl>=1\.16,<2.*pip install 'parity\[trl\]'"):
            check_trl_version(version)


def make_trainer(model_dir, tmp_path, dataset, tokenizer=None, **overrides):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    return ParityGRPOTrainer(model=model, reward_funcs=length_reward, args=grpo_args(tmp_path, **overrides),
                             train_dataset=dataset, processing_class=tokenizer)


def test_use_vllm_refused(llama_dir, tmp_path, dataset):
    with pytest.raises(TRLIntegrationError, match="leave use_vllm=False"):
        make_trainer(llama_dir, tmp_path, dataset, use_vllm=True)


def test_tokenizer_that_does_not_match_the_model_refused(llama_dir, tmp_path, dataset):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(1000)])
    with pytest.raises(TRLIntegrationError, match="does not match the model.*AutoTokenizer.from_pretrained"):
        make_trainer(llama_dir, tmp_path, dataset, tokenizer=tokenizer)


def test_generation_options_parity_lacks_refused(llama_dir, tmp_path, dataset):
    with pytest.raises(TRLIntegrationError, match="no use_beam_search"):
        make_trainer(llama_dir, tmp_path, dataset, generation_kwargs={"use_beam_search": True})
    with pytest.raises(TRLIntegrationError, match=r"\['n'\].*parity sets these itself"):
        make_trainer(llama_dir, tmp_path, dataset, generation_kwargs={"n": 2})


def test_sampling_settings_come_from_trl_args(llama_dir, tmp_path, dataset):
    trainer = make_trainer(llama_dir, tmp_path, dataset, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05,
                           max_completion_length=5, generation_kwargs={"seed": 11, "min_tokens": 2})
    p = trainer.vllm_generation.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.seed, p.min_tokens) == (0.7, 0.9, 20, 0.05, 5, 11, 2)
    assert trainer.engine.model_config.eos_token_ids == trainer.eos_token_ids
    assert trainer.engine.device == trainer.accelerator.device


def test_vision_inputs_refused(llama_dir, tmp_path, dataset):
    trainer = make_trainer(llama_dir, tmp_path, dataset)
    with pytest.raises(TRLIntegrationError, match="text only"):
        trainer.vllm_generation.generate([[1, 2, 3]], images=[["an image"]], num_generations=1)


def test_exact_mode_rollout_and_trainer_logprobs_bitwise_equal(llama_dir, tmp_path, dataset):
    """parity's own model, deterministic: TRL's logged logp difference is exactly 0 at every step, and the
    logprobs inside TRL's loss (with grad) equal the rollout logprobs bit for bit, with a repetition penalty on."""
    from parity.precision.policy import PrecisionPolicy
    from parity.trainer.causal_lm import ParityForCausalLM

    model = ParityForCausalLM.from_pretrained(llama_dir, policy=PrecisionPolicy("fp32", deterministic=True),
                                              device="cpu", max_positions=64)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    args = grpo_args(tmp_path, max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                     repetition_penalty=1.3)  # TRL's default gradient checkpointing: recomputed forwards, same bits
    trainer = ParityGRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=dataset,
                                processing_class=tokenizer)
    recorder = Recorder(trainer, tokenizer)
    loss_logps = []  # (completion ids, logprobs) of every row TRL scored with grad, for its loss
    real = trainer._get_per_token_logps_and_entropies

    def scored(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        out = real(model, input_ids, attention_mask, logits_to_keep, **kwargs)
        if torch.is_grad_enabled():
            keep = attention_mask[:, -logits_to_keep:].bool()
            for ids, lp, m in zip(input_ids[:, -logits_to_keep:], out[0].detach(), keep):
                loss_logps.append((tuple(ids[m].tolist()), lp[m]))
        return out

    trainer._get_per_token_logps_and_entropies = scored
    trainer.train()

    assert trainer.engine.model.kernels.deterministic
    logs = [h for h in trainer.state.log_history if "sampling/sampling_logp_difference/max" in h]
    assert len(logs) == 2
    for logged in logs:
        assert logged["sampling/sampling_logp_difference/mean"] == 0.0
        assert logged["sampling/sampling_logp_difference/max"] == 0.0
        assert logged["sampling/importance_sampling_ratio/min"] == logged["sampling/importance_sampling_ratio/max"] == 1.0
    rollout = {}
    for g in recorder.generations[-1:]:  # the last step's rollouts are what its loss scored
        lps = g["parity"].split([len(c) for c in g["completion_ids"]])
        rollout.update({tuple(c): lp for c, lp in zip(g["completion_ids"], lps)})
    last = loss_logps[-len(recorder.generations[-1]["completion_ids"]):]
    assert last and all(torch.equal(lp, rollout[ids]) for ids, lp in last)
    assert [s["version"] for s in recorder.syncs] == [1, 2]
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters()), "training changed nothing"


def test_exact_mode_entropies_are_values_unless_trls_entropy_bonus_needs_their_gradient(llama_dir):
    """TRL's entropy (its metric, its entropy mask, its entropy bonus) from the parity model: the entropy of the
    sampled distribution (float64 reference from the model's own logits); no [tokens, vocab] graph kept for it
    unless the loss differentiates it; not computed at all when TRL does not ask."""
    from parity.engine.sampling_params import SamplingParams
    from parity.integrations.trl import _parity_logps_and_entropies
    from parity.precision.policy import PrecisionPolicy
    from parity.trainer.causal_lm import ParityForCausalLM

    model = ParityForCausalLM.from_pretrained(llama_dir, policy=PrecisionPolicy("fp32", deterministic=True),
                                              device="cpu", max_positions=64)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 0], [0, 9, 8, 7, 6, 5, 4]])
    mask = (ids != 0).long()  # prompts left-padded, completions (the last 3 columns) right-padded
    keep, params = 3, SamplingParams(temperature=TEMPERATURE, max_tokens=3)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep + 1).logits[:, :-1].double()
    ref_lp = torch.log_softmax(logits / TEMPERATURE, -1)
    ref_entropy = -(ref_lp.exp() * ref_lp).sum(-1)
    ref_picked = ref_lp.gather(-1, ids[:, -keep:, None])[..., 0]
    real = mask[:, -keep:].bool()

    logps, entropies = _parity_logps_and_entropies(model, ids, mask, keep, params, 2, entropy=True, entropy_grad=False)
    assert logps.requires_grad and not entropies.requires_grad
    torch.testing.assert_close(entropies[real].double(), ref_entropy[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(logps[real].double(), ref_picked[real], rtol=0, atol=1e-5)
    assert (entropies[~real] == 0).all() and (logps[~real] == 0).all()

    _, with_grad = _parity_logps_and_entropies(model, ids, mask, keep, params, 2, entropy=True, entropy_grad=True)
    assert with_grad.requires_grad and torch.equal(with_grad.detach(), entropies)
    _, none = _parity_logps_and_entropies(model, ids, mask, keep, params, 2, entropy=False)
    assert none is None


def test_peft_adapters_merged_for_the_sync_and_engine_sleeps_between_rollouts(llama_dir, tmp_path, dataset):
    """LoRA: the engine receives base + adapter (merged for the copy, unmerged after); with TRL's sleep flag the
    engine releases its weights and KV cache after each rollout and is refilled by the next sync."""
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    args = grpo_args(tmp_path, max_steps=2, per_device_train_batch_size=4, num_generations=2, learning_rate=5e-2,
                     vllm_enable_sleep_mode=True)
    trainer = ParityGRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=dataset,
                                processing_class=tokenizer, peft_config=lora)
    assert trainer.engine.sleep_state is not None  # asleep from the start, like TRL's colocated vLLM
    recorder = Recorder(trainer, tokenizer)
    trainer.train()
    assert [s["version"] for s in recorder.syncs] == [1, 2]
    for s in recorder.syncs:  # vs the PEFT model's own forward: adapters active, so a sync left merged would double them
        torch.testing.assert_close(s["engine"], s["trainer"], rtol=0, atol=2e-5)
    state = trainer.engine.sleep_state
    assert state is not None and state.level == 2 and state.kv_cache_released
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    base_lp = hf_logprobs(base, recorder.prompt, recorder.completion, TEMPERATURE)
    assert (recorder.syncs[0]["engine"] - base_lp).abs().max() > 1e-3  # the adapter's contribution reached the engine


def test_engine_options_for_a_parity_model_belong_to_its_policy(llama_dir, tmp_path, dataset):
    from parity.precision.policy import PrecisionPolicy
    from parity.trainer.causal_lm import ParityForCausalLM

    model = ParityForCausalLM.from_pretrained(llama_dir, policy=PrecisionPolicy("fp32", deterministic=True),
                                              device="cpu", max_positions=64)
    with pytest.raises(TRLIntegrationError, match="own precision policy"):
        ParityGRPOTrainer(model=model, reward_funcs=length_reward, args=grpo_args(tmp_path, gradient_checkpointing=False),
                          train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(llama_dir),
                          parity=ParityRolloutConfig(dtype="bf16"))


def _ddp_worker(rank: int, model_dir: str, out_dir: str) -> dict:
    """One rank of a 2-process DDP run (gloo): TRL splits the batch, each rank samples with its own engine."""
    prompts = [[{"role": "user", "content": f"What is {i} + {i + 1}?"}] for i in range(16)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = grpo_args(out_dir, max_steps=2, per_device_train_batch_size=4, num_generations=4, ddp_backend="gloo")
    trainer = ParityGRPOTrainer(model=model, reward_funcs=length_reward, args=args, processing_class=tokenizer,
                                train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    recorder = Recorder(trainer, tokenizer)
    trainer.train()
    return {"wrapper": type(trainer.model_wrapped).__name__, "seed": trainer.engine.config.seed,
            "syncs": [(s["version"], s["engine"], s["trainer"]) for s in recorder.syncs],
            "prompts": [g["prompt_ids"] for g in recorder.generations]}


@pytest.mark.slow
def test_ddp_one_engine_per_process_synced_from_the_replica(llama_dir, tmp_path):
    from spawn_ranks import run_ranks

    ranks = run_ranks(_ddp_worker, 2, tmp_path, llama_dir, str(tmp_path))
    assert [r["wrapper"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert ranks[0]["seed"] != ranks[1]["seed"]  # per-process sampling streams, as TRL seeds its colocated vLLM
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # each rank's engine generates its own share
    for r in ranks:
        assert [v for v, _, _ in r["syncs"]] == [1, 2]
        for _, engine_lp, trainer_lp in r["syncs"]:
            torch.testing.assert_close(engine_lp, trainer_lp, rtol=0, atol=2e-5)
    for (_, a, _), (_, b, _) in zip(ranks[0]["syncs"], ranks[1]["syncs"]):
        assert torch.equal(a, b)  # the DDP replicas' weights, bit for bit in both engines
