"""Qwen3-MoE on the GPU: fast-mode throughput, batch-1 decode latency, deterministic mode's cost and bitwise
check, optionally beside vLLM on the same checkpoint.

Model: Qwen3-30B-A3B's shapes (hidden 2048, 32/4 heads, head_dim 128, 128 experts, 8 per token,
moe_intermediate 768, vocab 151936), random init, bf16, written straight to safetensors with HF's per-expert
names on the GPU (HF's writer would take minutes). Full depth is 48 layers (~60 GB of weights); the default
writes `--layers 8` (~10 GB). The figures are for that 8-layer model and do not scale by 48/8: the LM head
(151936 x 2048) is a fixed part, and at batch 1 a step reads only the 8 experts each layer picks. The JSON's
`scaling_to_48_layers` gives the ratio of bytes a decode step reads (weights + KV) at 48 vs 8 layers from the
shapes, for batch 1 and for workload A's batch; a memory-bound step scales by that ratio, a launch-bound one by
up to 48/8 (a model of the cost, not a measurement: measure 48 layers to know).
  Workload A: 256 prompts of random token ids, input lengths U[100, 1024] (seeded), 512 output tokens, EOS
              ignored, greedy (benchmarks/throughput.py's).
  Batch 1:    fresh 128-token prompts, ms per output token over 128 decode steps (a prefill alone subtracted).
  Deterministic: `--det-prompts` prompts of workload A's lengths, new to both engines' prefix caches (the fast
              engine has run A), in fast and deterministic mode (tok/s ratio), and a bitwise check: 4 prompts
              sampled alone and in a batch of 32, plus the trainer's parity forward (`token_logprobs`), all equal
              bit for bit.
  vLLM (optional, `--vllm-path`): `bash ../shared/peers/vllm/prepare.sh --moe` here (keeps vllm/_moe_C; writes
              .vl/a, .vl/b, .vl/c), carry them, run their gpu.sh there (installs into /tmp/vsite), then pass
              `--vllm-path /tmp/vsite`; workload A and batch 1 run first, in a subprocess, on the same prompts.

Each engine (vLLM's too) first runs `--warm-prompts` other prompts of A's lengths, 8 tokens each (full prefill
chunks, decode at their batch), so no timed step meets an uncompiled kernel variant. Parts run in order of need
(vLLM, parity fast A, batch 1, deterministic cost, bitwise); `--skip` drops later ones, `--num-prompts` shrinks A
for both systems, `--det-prompts` the deterministic comparison.

  python -m benchmarks.moe_device --out $OUT --vllm-path /tmp/vsite   # on the GPU (H200: 178 s at 0d2a8b9)
  python -m benchmarks.moe_device --smoke                    # tiny MoE on CPU: checks the script only
Writes moe_device.json after each part (with `elapsed_s`), so a run cut by the time limit keeps what it measured.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import free_memory, run_env, run_worker, workload_parser
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


def decode_step_bytes(shapes: dict, layers: int, batch: int, context: int) -> float:
    """Bytes one bf16 decode step of `batch` sequences at `context` tokens reads: the LM head; per layer the
    attention projections, the router, the experts the batch is expected to hit (E * (1 - (1 - k/E)^batch),
    routing taken as uniform) and the KV cache."""
    h, e, k = shapes["hidden_size"], shapes["num_experts"], shapes["num_experts_per_tok"]
    q, kv = shapes["num_attention_heads"] * shapes["head_dim"], shapes["num_key_value_heads"] * shapes["head_dim"]
    experts_hit = e * (1 - (1 - k / e) ** batch)
    per_layer = h * (2 * q + 2 * kv) + e * h + experts_hit * 3 * h * shapes["moe_intermediate_size"] \
        + batch * context * 2 * kv
    return 2.0 * (shapes["vocab_size"] * h + layers * per_layer)


def scaling_to_48_layers(shapes: dict, args, prompts) -> dict:
    """How far the measured per-token figures are from the 48-layer model's, by the bytes model above."""
    mean_prompt = sum(map(len, prompts)) / len(prompts)
    cases = {"batch1": (1, 128 + args.batch1_steps // 2),
             "workload_a": (min(args.max_num_seqs, len(prompts)), round(mean_prompt + args.output_len / 2))}
    out: dict = {name: {"batch": b, "context": c, "layers_ratio": 48 / args.layers, "bytes_ratio":
                        decode_step_bytes(shapes, 48, b, c) / decode_step_bytes(shapes, args.layers, b, c)}
                 for name, (b, c) in cases.items()}
    out["note"] = ("a model of the cost from the shapes, not a measurement: a memory-bound decode step at 48 layers "
                   "takes about bytes_ratio x the measured one, a launch-bound one up to layers_ratio x")
    return out


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


def started_engine(path: Path, args, warm, clock: Clock, results: dict, key: str, **kwargs) -> Engine:
    """An engine on `path`, warmed up on `warm` (8 tokens each); its load and warm-up seconds go to results[key]."""
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(str(path), dtype="bf16", device=args.device, max_model_len=args.max_model_len,
                                    max_num_seqs=args.max_num_seqs, **kwargs)
    loaded = time.perf_counter() - t0
    run_parity(engine, warm, [8] * len(warm), clock)
    results[key] = {"load_s": loaded, "warm_up_s": time.perf_counter() - t0 - loaded}
    return engine


def timed(engine: Engine, prompts, out_lens, clock: Clock) -> dict:
    """run_parity's figures, plus the seconds of the steps that prefill."""
    out = run_parity(engine, prompts, out_lens, clock)
    return {**out, "prefill_steps_s": out["seconds"] - out["decode_s"]}


def parity_part(path: Path, args, prompts, det_prompts, out_lens, warm, vocab: int, clock: Clock, results: dict,
                save) -> None:
    engine = started_engine(path, args, warm, clock, results, "fast_start")
    results["fast_workload_a"] = timed(engine, prompts, out_lens, clock)
    save()
    if "batch1" not in args.skip:
        results["fast_batch1_ms_per_token"] = batch1_ms_per_token(engine, vocab, args.batch1_steps)
        save()
    if "deterministic" in args.skip:
        return
    det_lens = [args.output_len] * len(det_prompts)
    results["fast_det_prompts"] = timed(engine, det_prompts, det_lens, clock)
    save()
    del engine
    free_memory(args.device)
    engine = started_engine(path, args, warm, clock, results, "deterministic_start", deterministic=True)
    results["deterministic_det_prompts"] = timed(engine, det_prompts, det_lens, clock)
    fast, det = results["fast_det_prompts"], results["deterministic_det_prompts"]
    results["deterministic_cost_x"] = fast["output_tok_s"] / det["output_tok_s"]
    results["deterministic_decode_cost_x"] = det["decode_s"] / fast["decode_s"]
    save()
    if "batch1" not in args.skip:
        results["deterministic_batch1_ms_per_token"] = batch1_ms_per_token(engine, vocab, args.batch1_steps)
        save()
    if "bitwise" not in args.skip:
        results["deterministic_bitwise"] = bitwise_check(engine, vocab, args.bitwise_batch)
        save()
    del engine
    free_memory(args.device)


VLLM_WORKER = r"""
import json, os, sys, time
t_start = time.perf_counter()
args = json.loads(sys.stdin.read())  # the prompts exceed the argument-list limit
result = {}
def save():  # after each part: the parent reads this file even if the worker is killed or hangs at exit
    with open(args["result"], "w") as f:
        json.dump(result, f)
import vllm
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=args["path"], skip_tokenizer_init=True, dtype="bfloat16", max_model_len=args["max_model_len"],
          max_num_seqs=args["max_num_seqs"], gpu_memory_utilization=0.85, seed=0)
result.update(version=vllm.__version__, init_s=time.perf_counter() - t_start)
sp = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
tokens = lambda ps: [TokensPrompt(prompt_token_ids=p) for p in ps]
t0 = time.perf_counter()
llm.generate(tokens(args["warm"]), sp(8), use_tqdm=False)
result["warm_up_s"] = time.perf_counter() - t0
t0 = time.perf_counter()
outs = llm.generate(tokens(args["prompts"]), [sp(n) for n in args["out_lens"]], use_tqdm=False)
elapsed = time.perf_counter() - t0
produced = sum(len(o.outputs[0].token_ids) for o in outs)
result.update(output_tok_s=produced / elapsed, seconds=elapsed, output_tokens=produced)
save()
if args["batch1"]:
    warm, first, whole = (tokens([p]) for p in args["batch1_prompts"])
    llm.generate(warm, sp(args["steps"] + 1), use_tqdm=False)
    t0 = time.perf_counter(); llm.generate(first, sp(1), use_tqdm=False); prefill = time.perf_counter() - t0
    t0 = time.perf_counter(); llm.generate(whole, sp(args["steps"] + 1), use_tqdm=False)
    result["batch1_ms_per_token"] = (time.perf_counter() - t0 - prefill) / args["steps"] * 1e3
    save()
sys.stdout.flush()
os._exit(0)  # everything is written; vLLM's engine-core shutdown can hang
"""


def vllm_part(path: Path, args, prompts, out_lens, warm, vocab: int, tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{args.vllm_path}:{os.environ.get('PYTHONPATH', '')}")
    result = tmp / "vllm-result.json"
    payload = json.dumps({"path": str(path), "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                          "prompts": prompts, "out_lens": out_lens, "warm": warm, "steps": args.batch1_steps,
                          "batch1": "batch1" not in args.skip, "batch1_prompts": batch1_prompts(vocab),
                          "result": str(result)})
    t0 = time.perf_counter()
    run = run_worker([sys.executable, "-c", VLLM_WORKER], env, args.vllm_timeout, tmp / "vllm-worker.log", payload)
    out = json.loads(result.read_text()) if result.is_file() else {}
    out["wall_s"] = time.perf_counter() - t0
    if "output_tok_s" not in out:
        status = (f"exit {run.returncode}" if run.returncode is not None
                  else f"killed after --vllm-timeout {args.vllm_timeout} s")
        out.update(error=status + run.leftovers, stderr_tail=run.output[-3000:])
    return out


def main() -> None:
    ap = workload_parser(__doc__, "tiny MoE on CPU, to check the script")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers written (Qwen3-30B-A3B has 48)")
    ap.add_argument("--model-dir", type=Path, help="reuse a checkpoint written by an earlier run")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--batch1-steps", type=int, default=128)
    ap.add_argument("--det-prompts", type=int, default=64, help="prompts timed in both modes (A's lengths)")
    ap.add_argument("--bitwise-batch", type=int, default=32)
    ap.add_argument("--vllm-path", help="vLLM's site folder from ../shared/peers/vllm/prepare.sh --moe")
    ap.add_argument("--vllm-timeout", type=float, default=300.0, help="seconds before the vLLM worker is killed")
    ap.add_argument("--warm-prompts", type=int, default=32, help="prompts of A's lengths each engine warms up on")
    ap.add_argument("--skip", nargs="*", default=[], choices=["batch1", "deterministic", "bitwise"],
                    help="parts not to run (deterministic: its cost and its bitwise check)")
    args = ap.parse_args()
    shapes = QWEN3_30B_A3B
    if args.smoke:
        args.device, shapes = "cpu", SMOKE
        args.num_prompts, args.output_len, args.layers, args.batch1_steps = 4, 6, 2, 4
        args.det_prompts, args.bitwise_batch, args.max_num_seqs, args.max_model_len = 4, 6, 8, 512
        args.warm_prompts = 3
    else:
        args.device = "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    results: dict = run_env(device, args)
    results["model"] = {**shapes, "num_hidden_layers": args.layers, "note": "random init; Qwen3-30B-A3B has 48 layers"}
    started = time.perf_counter()

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        (args.out / "moe_device.json").write_text(json.dumps(results, indent=1))

    clock = Clock(device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = args.model_dir or write_moe_checkpoint(Path(tmp) / "qwen3-moe", shapes, args.layers, args.device)
        results["write_model_s"] = time.perf_counter() - t0
        vocab = shapes["vocab_size"]
        lo_hi = (10, 40) if args.smoke else (100, 1024)
        # ids the tokenizer knows (vLLM decodes them); three disjoint sets, so no timed run hits the prefix cache
        prompts = random_prompts(args.num_prompts, 384, *lo_hi, seed=0)
        det_prompts = random_prompts(args.det_prompts, 384, *lo_hi, seed=1)
        warm = random_prompts(args.warm_prompts, 384, *lo_hi, seed=13)
        out_lens = [args.output_len] * args.num_prompts
        results["scaling_to_48_layers"] = scaling_to_48_layers(shapes, args, prompts)
        save()
        if args.vllm_path:  # first: vLLM takes gpu_memory_utilization of the GPU, so it runs before parity holds any
            results["vllm"] = vllm_part(path, args, prompts, out_lens, warm, vocab, Path(tmp))
            save()
        parity_part(path, args, prompts, det_prompts, out_lens, warm, vocab, clock, results, save)
        vllm = results.get("vllm", {})
        if "output_tok_s" in vllm:
            results["fast_vs_vllm_throughput_x"] = results["fast_workload_a"]["output_tok_s"] / vllm["output_tok_s"]
        if "batch1_ms_per_token" in vllm and "fast_batch1_ms_per_token" in results:
            results["batch1_vs_vllm_x"] = results["fast_batch1_ms_per_token"] / vllm["batch1_ms_per_token"]
        save()
    keys = ["fast_batch1_ms_per_token", "deterministic_cost_x", "deterministic_decode_cost_x", "deterministic_bitwise",
            "fast_vs_vllm_throughput_x", "batch1_vs_vllm_x", "elapsed_s"]
    print(json.dumps({"fast_output_tok_s": results["fast_workload_a"]["output_tok_s"],
                      **{k: results.get(k) for k in keys}}, indent=1))


if __name__ == "__main__":
    main()
