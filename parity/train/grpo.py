"""GRPO with parity as the in-process rollout engine: rollout -> reward -> trainer logprobs -> clipped,
IS-corrected policy loss -> optimizer step (accelerate) -> weight sync -> repeat.

One step, with the phase each metric's time belongs to:
  rollout  the engine samples `group_size` responses for each of `prompts_per_step` task prompts;
           exact-match rewards; group-normalised advantages.
  logprob  the trainer recomputes every response token's logprob at the current weights (no grad):
           the PPO "old" policy, and the trainer side of the rollout/trainer mismatch metrics and of
           the importance-sampling correction (token TIS by default).
  train    per minibatch: logprobs with grad, clipped policy loss times the IS weights,
           `accelerator.backward` (fp16: loss scaling), gradient clipping, optimizer step.
  sync     `engine.update_weights(model)`: in place, version bumped, prefix cache dropped.
With `sleep_level`, the engine sleeps from the end of the rollout until the sync (vLLM's order:
wake weights, update, wake KV cache), and the freed memory is logged.

The trainer (`trainer.model`): the HF transformers model in float32 under `optim.mixed_precision` autocast, or
parity's own decoder (`ParityForCausalLM`, a copy of the engine's model: same dtype, policy, weights, RoPE tables;
float32 master weights in `MasterWeightAdamW`) with the engine in deterministic mode, whose logprob phase gives
the rollout's logprobs bit for bit (mismatch exactly 0) and whose sync hands over HF-named views of its weights.

Prompts are the task's (`Task.prompt`: bare text, or with `task.chat` a user message through the chat
template), encoded by the engine for rollouts, the warm-start and the evaluation alike. With `eval.enabled`,
greedy accuracy on the whole held-out split is measured before the warm-start, after it, every
`eval.every` steps and after the last step (`evaluation.py`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from parity.engine.engine import Engine
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout
from parity.models.config import ModelConfig
from parity.models.loader import Checkpoint
from parity.precision.importance_sampling import importance_weights
from parity.precision.metrics import mismatch_metrics
from parity.testing.factory import write_tiny_model
from parity.train.config import TrainConfig
from parity.train.evaluation import Evaluation, evaluate, paired_gain
from parity.train.tasks import Task
from parity.train.tracking import Tracker
from parity.trainer.causal_lm import ParityForCausalLM
from parity.trainer.logprobs import trainer_logprobs
from parity.trainer.losses import group_advantages, policy_loss
from parity.trainer.master_weights import MasterWeightAdamW


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    summary: dict[str, Any]
    out_dir: Path
    run_dir: Path | None  # the W&B run directory, if W&B was on
    warmstart_loss: float | None = None
    evals: list[Evaluation] = field(default_factory=list)  # held-out evaluations, in order (eval.enabled)
    metrics_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.metrics_file = self.out_dir / "metrics.jsonl"


def _sft_batch(prompts: list[list[int]], answers: list[list[int]], eos: int, device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt + answer + `eos` (token ids), right-padded; labels only on answer + EOS."""
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        answer = answer + [eos]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    pad = lambda x, v: x + [v] * (width - len(x))
    ids = torch.tensor([pad(r, eos) for r in rows], device=device)
    mask = torch.tensor([pad([1] * len(r), 0) for r in rows], device=device)
    return ids, mask, torch.tensor([pad(lab, -100) for lab in labels], device=device)


def _stop_token(model_dir: Path) -> int:
    """The EOS the warm-start teaches: the model config's (generation_config.json first), which is what the
    engine stops on and the reward demands. Not `tokenizer.eos_token_id`: transformers 5.17 reads SmolLM2's
    GGUF tokenizer with eos_token <|im_start|> while the model ends turns with <|im_end|>, so a warm-start on
    the tokenizer's EOS taught a token the engine never stops on (every rollout hit max_tokens, reward 0)."""
    eos_ids = ModelConfig.from_pretrained(model_dir).eos_token_ids
    if not eos_ids:
        raise ValueError(f"{model_dir}: the model config names no eos_token_id; the exact-match reward needs "
                         "responses that stop with EOS")
    return eos_ids[0]


def _adamw(model: torch.nn.Module, **adamw_kwargs) -> torch.optim.Optimizer:
    """AdamW; on float32 master weights when the model computes in half precision (parity's model in bf16)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return MasterWeightAdamW(model.parameters(), **adamw_kwargs)
    return torch.optim.AdamW(model.parameters(), **adamw_kwargs)


def trainable_model_dir(path: str) -> Path:
    """An HF directory for `model.path`: itself, or for a .gguf file or a model alias the GGUF dequantized
    once into an HF directory in the cache (the trainer is an HF model; parity's engine could read the GGUF
    itself, but loads the same directory so both start from identical weights)."""
    return Checkpoint.resolve(path).hf_dir()


class GRPOTrainer:
    def __init__(self, config: TrainConfig, tracker: Tracker | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = cfg = config
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # accelerate keeps one process-wide state; reset it so that one process can run several
        # experiments with different precisions (the device benchmark runs fp16, then bf16).
        AcceleratorState._reset_state(reset_partial_state=True)
        # parity's model computes in its own (the engine's) dtype: no autocast around it.
        exact = cfg.trainer.model == "parity"
        mixed = "no" if cfg.optim.mixed_precision == "fp32" or exact else cfg.optim.mixed_precision
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=device == "cpu")
        self.device = self.accelerator.device
        model_dir = (trainable_model_dir(cfg.model.path) if cfg.model.path
                     else write_tiny_model(self.out_dir / "init-model", cfg.model.factory))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.eos_id = _stop_token(model_dir)
        self.task = Task(cfg.task)
        self.heldout = self.task.heldout_problems() if cfg.eval.enabled else []
        self.evals: list[Evaluation] = []
        engine_options = {**asdict(cfg.engine), "device": str(self.device)}
        self.engine = Engine.from_pretrained(model_dir, **engine_options)
        if exact:
            model = self._parity_model()
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        self.evaluate("base", 0)
        self.warmstart_loss = self._warm_start(model) if cfg.warmstart.steps > 0 else None
        self.model, self.optimizer = self.accelerator.prepare(
            model, _adamw(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay))
        if self.warmstart_loss is not None:
            self.engine.update_weights(self._synced_model())
            self.evaluate("warmstart", 0)
        r = cfg.rollout
        self.sampling = SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                       max_tokens=r.max_tokens)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _parity_model(self) -> ParityForCausalLM:
        """parity's decoder with the engine's config, weights, RoPE tables and precision policy."""
        model = ParityForCausalLM.from_engine(self.engine)
        dtype = model.policy.dtype
        if dtype == "fp16" or self.config.optim.mixed_precision != dtype:  # engine.dtype=auto, resolved now
            raise ValueError(f"trainer.model=parity computes in the engine's dtype ({dtype}): set engine.dtype and "
                             f"optim.mixed_precision to bf16 or fp32 (got optim.mixed_precision="
                             f"{self.config.optim.mixed_precision})")
        return model

    def _synced_model(self):
        """What the engine reads weights from: the HF model, or parity's decoder (HF-named views, no renaming)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.model if isinstance(model, ParityForCausalLM) else model

    def _grad_params(self) -> list[torch.Tensor]:
        """The tensors holding the gradients to clip: the float32 masters of a half-precision parity model."""
        if isinstance(self.optimizer.optimizer, MasterWeightAdamW):
            return self.optimizer.optimizer.master_params
        return list(self.model.parameters())

    # ------------------------------------------------------------------------------ warm start
    def _warm_start(self, model) -> float:
        """A few supervised steps (AdamW on float32 weights or masters) on a noisy teacher's answers, so RL starts
        with some reward."""
        ws = self.config.warmstart
        optimizer = _adamw(model, lr=ws.lr)  # with torch's default weight decay (0.01)
        model.train()
        loss = torch.tensor(float("nan"))
        for _ in range(ws.steps):
            examples = self.task.warmstart_examples(self.rng, ws.batch_size, ws.accuracy)
            prompts = [self.engine.encode(self.task.prompt(p)) for p in examples]
            answers = [self.tokenizer.encode(p.answer, add_special_tokens=False) for p in examples]
            ids, mask, labels = _sft_batch(prompts, answers, self.eos_id, self.device)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if isinstance(optimizer, MasterWeightAdamW):
            optimizer.release()
        return loss.item()

    def evaluate(self, stage: str, step: int) -> Evaluation | None:
        """Greedy accuracy of the engine's current weights on the whole held-out split (None if eval is off)."""
        if not self.config.eval.enabled:
            return None
        max_tokens = self.config.eval.max_tokens or self.config.rollout.max_tokens
        result = evaluate(self.engine, self.task, self.heldout, max_tokens, stage, step)
        self.evals.append(result)
        return result

    # ------------------------------------------------------------------------------------- step
    def _logprobs(self, rollouts: list[Rollout], with_grad: bool):
        return trainer_logprobs(self.model, rollouts, self.sampling, with_grad=with_grad,
                                logits_fp32=self.config.engine.logits_fp32, pad_id=self.pad_id)

    def _clock(self) -> float:
        """Wall time, after the device has finished queued work (so phase timings are honest on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _train_phase(self, rollouts: list[Rollout], old, advantages: torch.Tensor, correction) -> dict[str, float]:
        """One optimizer step per minibatch (a random split of the rollouts); stats averaged over them."""
        cfg = self.config
        self.model.train()
        stats: list[dict[str, float]] = []
        order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(self.rng.getrandbits(31)))
        for idx in order.chunk(cfg.loss.num_minibatches):
            new = self._logprobs([rollouts[i] for i in idx.tolist()], with_grad=True)
            width = new.mask.shape[1]  # this minibatch's longest response
            idx = idx.to(self.device)
            loss, loss_stats = policy_loss(
                new.logprobs, old.logprobs[idx, :width], advantages[idx], correction.mask[idx, :width],
                is_weights=correction.weights[idx, :width], clip_low=cfg.loss.clip_low,
                clip_high=cfg.loss.clip_high, dual_clip=cfg.loss.dual_clip, agg=cfg.loss.agg,
            )
            self.accelerator.backward(loss)  # fp16: scaled, and unscaled before clipping
            grad_norm = float(self.accelerator.clip_grad_norm_(self._grad_params(), cfg.optim.grad_clip))
            # A non-finite gradient would write inf/nan into every weight (and the engine's at the next sync):
            # skip that update, as verl does. Under fp16 the loss scaler already skips it and must see the step.
            finite = math.isfinite(grad_norm)
            if finite or self.accelerator.scaler is not None:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            stats.append({**loss_stats, "actor/grad_norm": grad_norm, "actor/nonfinite_grad_skipped": float(not finite)})
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}

    def step(self) -> dict[str, float]:
        cfg, engine = self.config, self.engine
        timings: dict[str, float] = {}

        start = self._clock()
        problems = self.task.sample(self.rng, cfg.rollout.prompts_per_step)
        rollouts = engine.generate([self.task.prompt(p) for p in problems], self.sampling)
        rewards = torch.tensor([self.task.reward(problems[r.prompt_index], r) for r in rollouts])
        advantages = group_advantages(rewards.view(len(problems), cfg.rollout.group_size),
                                      normalize_std=cfg.loss.normalize_std).flatten().to(self.device)
        timings["rollout"] = self._clock() - start
        sleep_stats = engine.sleep(cfg.sleep_level) if cfg.sleep_level else None

        start = self._clock()
        self.model.eval()
        with torch.no_grad():
            old = self._logprobs(rollouts, with_grad=False)
        mismatch = mismatch_metrics(old.rollout_logprobs, old.logprobs, old.mask)
        correction = importance_weights(old.rollout_logprobs, old.logprobs, old.mask, cfg.loss.importance_sampling)
        timings["logprob"] = self._clock() - start

        start = self._clock()
        train_stats = self._train_phase(rollouts, old, advantages, correction)
        timings["train"] = self._clock() - start

        start = self._clock()
        if sleep_stats is not None:
            engine.wake_up(["weights"])
        sync = engine.update_weights(self._synced_model())
        if sleep_stats is not None:
            engine.wake_up(["kv_cache"])
        timings["sync"] = self._clock() - start

        lengths = torch.tensor([len(r.output_ids) for r in rollouts], dtype=torch.float32)
        generated = int(lengths.sum())
        metrics = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response_length/clip_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            **{k: float(v) for k, v in mismatch.items()},
            **correction.stats,
            **train_stats,
            **{f"time/{k}_s": v for k, v in timings.items()},
            "time/step_s": sum(timings.values()),
            "throughput/rollout_tokens_per_s": generated / timings["rollout"],
            "throughput/train_tokens_per_s": float(old.mask.sum() + sum(len(r.prompt_ids) for r in rollouts))
            / timings["train"],
            "sync/seconds": sync.seconds,
            "sync/gb_per_s": sync.gb_per_s,
            "sync/bytes": float(sync.bytes_copied),
            "weight_version": float(sync.weight_version),
        }
        if sleep_stats is not None:
            metrics["sleep/freed_bytes"] = float(sleep_stats.freed_bytes)
            if sleep_stats.freed_reserved_bytes is not None:
                metrics["sleep/freed_reserved_bytes"] = float(sleep_stats.freed_reserved_bytes)
        return metrics

    # -------------------------------------------------------------------------------------- run
    def train(self, progress: bool = True) -> TrainResult:
        from tqdm import tqdm

        cfg = self.config
        history: list[dict[str, float]] = []
        if self.tracker is not None and self.evals:  # the accuracy GRPO starts from, beside step 0's metrics
            self.tracker.log(self.evals[-1].metrics(), step=0)
        start = time.perf_counter()
        bar = tqdm(range(cfg.steps), desc="grpo", unit="step", disable=not progress)
        for step in bar:
            elapsed = time.perf_counter() - start
            if cfg.time_limit_s is not None and elapsed + elapsed / max(step, 1) > cfg.time_limit_s:
                break  # the next step (as long as the mean so far) would end past the limit
            metrics = self.step()
            history.append(metrics)
            if self.tracker is not None:
                self.tracker.log(metrics, step=step)
            done = step + 1
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps:
                self._log_eval(self.evaluate("step", done))
            bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", len=f"{metrics['response_length/mean']:.1f}",
                            sync_ms=f"{1e3 * metrics['sync/seconds']:.0f}")
        bar.close()
        self._log_eval(self.evaluate("final", len(history)))
        summary = {**summarize(history, self.warmstart_loss), **eval_summary(self.evals)}
        if len(history) < cfg.steps:
            summary["final/stopped_at_time_limit"] = 1.0
        run_dir = None
        if self.tracker is not None:
            run_dir = self.tracker.run_dir
            self.tracker.finish(summary)
        return TrainResult(history, summary, self.out_dir, run_dir, self.warmstart_loss, self.evals)

    def _log_eval(self, result: Evaluation | None) -> None:
        if result is not None and self.tracker is not None:
            self.tracker.log(result.metrics(), step=result.step)


def summarize(history: list[dict[str, float]], warmstart_loss: float | None, window: int = 3) -> dict[str, float]:
    """Reward at the start and end (means over `window` steps), totals and mean phase timings."""
    if not history:
        return {"final/steps": 0.0}
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows)
    summary = {
        "final/reward_first": mean("reward/mean", history[:window]),
        "final/reward_last": mean("reward/mean", history[-window:]),
        "final/steps": float(len(history)),
        "final/total_time_s": sum(r["time/step_s"] for r in history),
    }
    for phase in ("rollout", "logprob", "train", "sync"):
        summary[f"final/mean_{phase}_s"] = mean(f"time/{phase}_s", history)
    if warmstart_loss is not None:
        summary["final/warmstart_loss"] = warmstart_loss
    return summary


def eval_summary(evals: list[Evaluation]) -> dict[str, float]:
    """Held-out accuracy (and its standard error) before the warm-start, after it and after GRPO, and
    GRPO's paired gain: the final evaluation minus the one GRPO started from, on the same problems."""
    summary: dict[str, float] = {}
    for e in evals:
        if e.stage != "step":
            summary.update({f"eval/{e.stage}_{k.removeprefix('eval/')}": v for k, v in e.metrics().items()
                            if k != "eval/problems"})
    finals = [e for e in evals if e.stage == "final"]
    if finals:
        start = next(e for e in reversed(evals) if e.stage in ("warmstart", "base"))
        gain = paired_gain(start.correct, finals[-1].correct)
        summary.update({f"eval/grpo_gain{'' if k == 'gain' else '_' + k}": v for k, v in gain.items()})
    return summary


def run_grpo(config: TrainConfig, progress: bool = True) -> TrainResult:
    """One experiment: a tracker (W&B per config.tracking, plus metrics.jsonl) around GRPOTrainer."""
    tracker = Tracker(config.tracking, config.to_dict(), config.out_dir)
    return GRPOTrainer(config, tracker).train(progress=progress)
