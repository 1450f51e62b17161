"""What vLLM's sampling options cost: generation throughput with each option against plain sampling, same
model, same prompts, same seeds, one process.

Model: random init with Qwen3-0.6B's shapes (vocabulary 151,936), bf16, CUDA graphs. Workload: 256 prompts
of random token ids, lengths U[100, 512] (seeded), 256 output tokens each, EOS ignored, temperature 1.
Options: repetition/presence/frequency penalties; logit_bias on 20 ids + min_tokens (EOS masked every step);
allowed_token_ids (the tokenizer's ids, so sampled tokens decode to text); the same + two stop strings that
never match (the incremental detokenizer runs on every token); logprobs=5; prompt_logprobs=5.

  python -m benchmarks.sampling_options --out $OUT      # on the GPU (a few minutes)
  python -m benchmarks.sampling_options --smoke         # tiny model on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import free_memory, run_env
from benchmarks.throughput import QWEN3_06B, SMOKE, Clock, random_prompts
from parity import Engine, SamplingParams
from parity.testing.factory import write_tiny_model


def option_sets(tokenizer_size: int, max_tokens: int) -> dict[str, dict]:
    """Name -> SamplingParams fields added to plain sampling."""
    allowed = list(range(tokenizer_size))
    return {
        "plain": {},
        "penalties": dict(repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.3),
        "logit_bias+min_tokens": dict(logit_bias={i: 0.5 for i in range(100, 120)}, min_tokens=max_tokens),
        "allowed_token_ids": dict(allowed_token_ids=allowed),
        "allowed_token_ids+stop": dict(allowed_token_ids=allowed, stop=["\x00never\x00", "</never>"]),
        "logprobs=5": dict(logprobs=5),
        "prompt_logprobs=5": dict(prompt_logprobs=5),
    }


def run(engine: Engine, prompts: list[list[int]], fields: dict, max_tokens: int, clock: Clock) -> dict:
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, ignore_eos=True, **fields)
              for i in range(len(prompts))]
    start = clock.now()
    out = engine.generate(prompts, params)
    seconds = clock.now() - start
    produced = sum(len(r.output_ids) for r in out)
    assert produced == max_tokens * len(prompts), "every request must produce exactly max_tokens tokens"
    return {"seconds": seconds, "output_tok_s": produced / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, to check the script")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="runs per option; the fastest is kept")
    args = ap.parse_args()
    spec, device = QWEN3_06B, "cuda"
    if args.smoke:
        spec, device = replace(SMOKE, init_device="cpu"), "cpu"
        args.num_prompts, args.output_len, args.repeats = 6, 8, 1
    clock = Clock(torch.device(device))
    results: dict = run_env(device, args)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(Path(tmp) / "model", spec)
        engine = Engine.from_pretrained(path, dtype="bf16" if device == "cuda" else "fp32", device=device,
                                        max_model_len=1024, max_num_seqs=256)
        vocab = engine.model_config.vocab_size
        prompts = random_prompts(args.num_prompts, vocab, *((100, 512) if not args.smoke else (10, 40)), seed=0)
        run(engine, prompts[:8], {}, 8, clock)  # warm-up: kernels compiled, graphs captured
        rows = {}
        for name, fields in option_sets(len(engine.tokenizer), args.output_len).items():
            runs = [run(engine, prompts, fields, args.output_len, clock) for _ in range(args.repeats)]
            rows[name] = max(runs, key=lambda r: r["output_tok_s"])
            rows[name]["vs_plain"] = rows[name]["output_tok_s"] / rows["plain"]["output_tok_s"]
            print(f"{name:24s} {rows[name]['output_tok_s']:10.0f} tok/s  {rows[name]['vs_plain']:.3f}x plain", flush=True)
        results["options"] = rows
        del engine
        free_memory(device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampling_options.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"wall {time.perf_counter() - t0:.0f} s")
