"""Qwen3-MoE on the GPU: fast-mode throughput, batch-1 decode latency, deterministic mode's cost and bitwise
check, optionally beside vLLM on the same checkpoint.

Model: Qwen3-30B-A3B's shapes (hidden 2048, 32/4 heads, head_dim 128, 128 experts, 8 per token,
moe_intermediate 768, vocab 151936), random init, bf16, written straight to safetensors with HF's per-expert
names on the GPU (HF's writer would take minutes). Full depth is 48 layers (~60 GB of weights); the default
writes `--layers 8` (~10 GB), so per-token figures scale by about 48/8 in the MoE and attention part: say so
beside every figure.
  Workload A: 256 prompts of random token ids, input lengths U[100, 1024] (seeded), 512 output tokens, EOS
              ignored, greedy (benchmarks/throughput.py's).
  Batch 1:    fresh 128-token prompts, ms per output token over 128 decode steps (a prefill alone subtracted).
  Deterministic: workload A's first `--det-prompts` prompts in fast and deterministic mode (tok/s ratio), and a
              bitwise check: 4 prompts sampled alone and in a batch of 32, plus the trainer's parity forward
              (`token_logprobs`), all equal bit for bit.
  vLLM (optional, `--vllm-path`): `bash ../shared/peers/vllm/prepare.sh --moe` here (keeps vllm/_moe_C; writes
              .vl/a, .vl/b, .vl/c), carry them, run their gpu.sh there (installs into /tmp/vsite), then pass
              `--vllm-path /tmp/vsite`; workload A and batch 1 run first, in a subprocess, on the same prompts.

  python -m benchmarks.moe_device --out $OUT                 # on the GPU (about 6-8 minutes on an H200)
  python -m benchmarks.moe_device --smoke                    # tiny MoE on CPU: checks the script only
Writes moe_device.json (after each part, so a run cut by the time limit keeps what it measured).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import free_memory, run_env, workload_parser
from benchmarks.throughput import Clock, random_prompts, run_parity
from parity import Engine, SamplingParams

QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=1_000_000.0,
)
SMOKE = dict(QWEN3_30B_A3B, vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)


def write_moe_checkpoint(path: Path, shapes: dict, num_layers: int, device: str, seed: int = 0) -> Path:
    """config.json + per-expert safetensors shards (HF's on-disk names) + the factory's tokenizer; random init
    (std 0.02, norms 1) made on `device`, one layer per shard."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    from parity.testing.factory import train_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(384)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen3MoeConfig(num_hidden_layers=num_layers, eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
                         **shapes)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    tokenizer.save_pretrained(path)
    g = torch.Generator(device=device).manual_seed(seed)
    h, v, i_moe = cfg.hidden_size, cfg.vocab_size, cfg.moe_intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def rand(*shape):
        return (0.02 * torch.randn(*shape, generator=g, device=device)).to(torch.bfloat16)

    ones = lambda n: torch.ones(n, dtype=torch.bfloat16, device=device)
    weight_map: dict[str, str] = {}

    def save(name: str, tensors: dict) -> None:
        save_file({k: t.contiguous().cpu() for k, t in tensors.items()}, str(path / name))
        weight_map.update({k: name for k in tensors})

    save("embed.safetensors", {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
                               "model.norm.weight": ones(h)})
    for layer in range(num_layers):
        p = f"model.layers.{layer}"
        t = {f"{p}.input_layernorm.weight": ones(h), f"{p}.post_attention_layernorm.weight": ones(h),
             f"{p}.self_attn.q_proj.weight": rand(q, h), f"{p}.self_attn.k_proj.weight": rand(kv, h),
             f"{p}.self_attn.v_proj.weight": rand(kv, h), f"{p}.self_attn.o_proj.weight": rand(h, q),
             f"{p}.self_attn.q_norm.weight": ones(cfg.head_dim), f"{p}.self_attn.k_norm.weight": ones(cfg.head_dim),
             f"{p}.mlp.gate.weight": rand(cfg.num_experts, h)}
        for e in range(cfg.num_experts):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = rand(i_moe, h)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = rand(i_moe, h)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = rand(h, i_moe)
        save(f"layer-{layer:03d}.safetensors", t)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def batch1_prompts(vocab: int) -> list[list[int]]:
    """Three fresh 128-token prompts (warm-up, prefill alone, prefill + decode), so no timed call hits the prefix
    cache and no timed call meets an uncompiled kernel variant; vLLM's worker gets the same three."""
    return random_prompts(3, vocab, 128, 128, seed=7)


def batch1_ms_per_token(engine: Engine, vocab: int, steps: int) -> float:
    warm, first, whole = batch1_prompts(vocab)
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    engine.generate([warm], greedy(steps + 1))  # graph capture, kernel compiles
    t0 = time.perf_counter()
    engine.generate([first], greedy(1))
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.generate([whole], greedy(steps + 1))
    return (time.perf_counter() - t0 - prefill) / steps * 1e3


def bitwise_check(engine: Engine, vocab: int, num_batch: int) -> dict:
    """4 prompts sampled alone and inside a batch of `num_batch`, and scored by the trainer's parity forward."""
    from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

    prompts = random_prompts(num_batch, vocab, 50, 300, seed=11)
    params = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, seed=3)
    batch = engine.generate(prompts, params)
    alone = [engine.generate([p], params)[0] for p in prompts[:4]]
    same_alone = all(a.output_ids == b.output_ids and a.output_logprobs == b.output_logprobs
                     for a, b in zip(alone, batch))
    trainer = parity_model_from_engine(engine, trainable=False)
    scored = token_logprobs(trainer, [r.prompt_ids for r in batch[:8]], [r.output_ids for r in batch[:8]])
    diff = max(float((s.cpu() - torch.tensor(r.output_logprobs)).abs().max()) for s, r in zip(scored, batch))
    del trainer
    return {"alone_equals_batched": same_alone, "trainer_max_abs_diff": diff, "trainer_bitwise": diff == 0.0}


def parity_part(path: Path, args, prompts, out_lens, vocab: int, clock: Clock, results: dict, save) -> None:
    common = dict(dtype="bf16", device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
    engine = Engine.from_pretrained(str(path), **common)
    run_parity(engine, prompts[:2], [4, 4], clock)  # warm-up
    results["fast_workload_a"] = run_parity(engine, prompts, out_lens, clock)
    save()
    results["fast_batch1_ms_per_token"] = batch1_ms_per_token(engine, vocab, args.batch1_steps)
    n = args.det_prompts
    results["fast_workload_a_det_subset"] = run_parity(engine, prompts[:n], out_lens[:n], clock)
    save()
    del engine
    free_memory(args.device)
    engine = Engine.from_pretrained(str(path), deterministic=True, **common)
    run_parity(engine, prompts[:2], [4, 4], clock)
    results["deterministic_workload_a_det_subset"] = run_parity(engine, prompts[:n], out_lens[:n], clock)
    fast, det = results["fast_workload_a_det_subset"], results["deterministic_workload_a_det_subset"]
    results["deterministic_cost_x"] = fast["output_tok_s"] / det["output_tok_s"]
    results["deterministic_batch1_ms_per_token"] = batch1_ms_per_token(engine, vocab, args.batch1_steps)
    save()
    results["deterministic_bitwise"] = bitwise_check(engine, vocab, args.bitwise_batch)
    save()
    del engine
    free_memory(args.device)


VLLM_WORKER = r"""
import json, sys, time
args = json.loads(sys.stdin.read())  # the prompts exceed the argument-list limit
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=args["path"], skip_tokenizer_init=True, dtype="bfloat16", max_model_len=args["max_model_len"],
          max_num_seqs=args["max_num_seqs"], gpu_memory_utilization=0.85, seed=0)
sp = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
prompts = [TokensPrompt(prompt_token_ids=p) for p in args["prompts"]]
llm.generate(prompts[:2], sp(4), use_tqdm=False)
t0 = time.perf_counter()
outs = llm.generate(prompts, [sp(n) for n in args["out_lens"]], use_tqdm=False)
elapsed = time.perf_counter() - t0
produced = sum(len(o.outputs[0].token_ids) for o in outs)
warm, first, whole = ([TokensPrompt(prompt_token_ids=p)] for p in args["batch1_prompts"])
llm.generate(warm, sp(args["steps"] + 1), use_tqdm=False)
t0 = time.perf_counter(); llm.generate(first, sp(1), use_tqdm=False); prefill = time.perf_counter() - t0
t0 = time.perf_counter(); llm.generate(whole, sp(args["steps"] + 1), use_tqdm=False)
ms = (time.perf_counter() - t0 - prefill) / args["steps"] * 1e3
import vllm
print("RESULT" + json.dumps({"version": vllm.__version__, "output_tok_s": produced / elapsed, "seconds": elapsed,
                             "batch1_ms_per_token": ms}))
"""


def vllm_part(path: Path, args, prompts, out_lens, vocab: int) -> dict:
    import os

    env = dict(os.environ, PYTHONPATH=f"{args.vllm_path}:{os.environ.get('PYTHONPATH', '')}")
    payload = json.dumps({"path": str(path), "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                          "prompts": prompts, "out_lens": out_lens, "steps": args.batch1_steps,
                          "batch1_prompts": batch1_prompts(vocab)})
    proc = subprocess.run([sys.executable, "-c", VLLM_WORKER], input=payload, env=env, capture_output=True, text=True,
                          timeout=args.vllm_timeout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    return json.loads(line[len("RESULT"):])


def main() -> None:
    ap = workload_parser(__doc__, "tiny MoE on CPU, to check the script")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers written (Qwen3-30B-A3B has 48)")
    ap.add_argument("--model-dir", type=Path, help="reuse a checkpoint written by an earlier run")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--batch1-steps", type=int, default=128)
    ap.add_argument("--det-prompts", type=int, default=64, help="workload A prompts timed in both modes")
    ap.add_argument("--bitwise-batch", type=int, default=32)
    ap.add_argument("--vllm-path", help="vLLM's site folder from ../shared/peers/vllm/prepare.sh --moe")
    ap.add_argument("--vllm-timeout", type=float, default=400.0)
    args = ap.parse_args()
    shapes = QWEN3_30B_A3B
    if args.smoke:
        args.device, shapes = "cpu", SMOKE
        args.num_prompts, args.output_len, args.layers, args.batch1_steps = 4, 6, 2, 4
        args.det_prompts, args.bitwise_batch, args.max_num_seqs, args.max_model_len = 4, 6, 8, 512
    else:
        args.device = "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    results: dict = run_env(device, args)
    results["model"] = {**shapes, "num_hidden_layers": args.layers, "note": "random init; Qwen3-30B-A3B has 48 layers"}
    save = lambda: (args.out / "moe_device.json").write_text(json.dumps(results, indent=1))
    clock = Clock(device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = args.model_dir or write_moe_checkpoint(Path(tmp) / "qwen3-moe", shapes, args.layers, args.device)
        results["write_model_s"] = time.perf_counter() - t0
        vocab = shapes["vocab_size"]
        lo_hi = (10, 40) if args.smoke else (100, 1024)
        prompts = random_prompts(args.num_prompts, 384, *lo_hi, seed=0)  # ids the tokenizer knows (vLLM decodes them)
        out_lens = [args.output_len] * args.num_prompts
        if args.vllm_path:  # first: vLLM takes gpu_memory_utilization of the GPU, so it runs before parity holds any
            results["vllm"] = vllm_part(path, args, prompts, out_lens, vocab)
            save()
        parity_part(path, args, prompts, out_lens, vocab, clock, results, save)
        if args.vllm_path:
            if "output_tok_s" in results["vllm"]:
                results["fast_vs_vllm_throughput_x"] = (results["fast_workload_a"]["output_tok_s"]
                                                        / results["vllm"]["output_tok_s"])
                results["batch1_vs_vllm_x"] = (results["fast_batch1_ms_per_token"]
                                               / results["vllm"]["batch1_ms_per_token"])
        save()
    keys = ["fast_batch1_ms_per_token", "deterministic_cost_x", "deterministic_bitwise", "fast_vs_vllm_throughput_x",
            "batch1_vs_vllm_x"]
    print(json.dumps({"fast_output_tok_s": results["fast_workload_a"]["output_tok_s"],
                      **{k: results.get(k) for k in keys}}, indent=1))


if __name__ == "__main__":
    main()
