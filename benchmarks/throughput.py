"""Generation throughput: parity (Triton kernels + CUDA graphs) beside HF transformers, same model, same
prompts, same GPU, one process.

Systems: (1) parity, (2) HF padded `generate` (sdpa, batch 64), (3) HF continuous batching
(`generate_batch`). Model: random init with Qwen3-0.6B's shapes (and Qwen2.5-1.5B's), bf16, written in
HF format by parity's factory and loaded by every system from the same directory.
  Workload A: 256 prompts of random token ids, input lengths U[100, 1024] (seeded), 512 output tokens
              each, EOS ignored, greedy.
  Workload B: the same prompts, output lengths U[100, 1024] (nano-vllm's benchmark).
Also: decode-only step time at batch 1/32/128/256 (context 1024) against the bandwidth roofline
((weight bytes + KV bytes read) / measured device copy bandwidth), time to first token of one
1024-token prompt, peak GPU memory, KV-cache waste, and kernel before/after timings.

  python -m benchmarks.throughput --out results/            # on the GPU (about 5 minutes on an H100)
  python -m benchmarks.throughput --smoke                    # tiny model on CPU: checks the script only
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import run_env, workload_parser
from parity import Engine, SamplingParams
from parity.testing.factory import TinyModelSpec, write_tiny_model

QWEN3_06B = TinyModelSpec(
    architecture="qwen3", hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
    head_dim=128, padded_vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
    initializer_range=0.02, init_device="cuda", save_dtype="bfloat16",
)
QWEN25_15B = replace(
    QWEN3_06B, architecture="qwen2", hidden_size=1536, intermediate_size=8960, num_heads=12, num_kv_heads=2,
)
QWEN3_8B = replace(QWEN3_06B, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                   tie_word_embeddings=False)
SMOKE = TinyModelSpec(architecture="qwen3", padded_vocab_size=1000, initializer_range=0.02)
# Qwen3's own context length (the specs above stop at 4096, and the loader refuses a longer max_model_len)
LONG_CONTEXT_SPECS = {name: replace(spec, max_position_embeddings=40960) for name, spec in
                      (("qwen3-0.6b", QWEN3_06B), ("qwen3-8b", QWEN3_8B))}


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(0, vocab, size=int(n_tok)).tolist() for n_tok in lens]


def output_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(lo, hi + 1, size=n).tolist()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 10)."""
    src = torch.randn(512 * 2**20, device=device)  # 2 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 512 * 2**20 * 4 / statistics.median(times[2:])


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------- parity
def kv_bytes_per_token(engine: Engine) -> int:
    cfg = engine.model_config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.model.dtype.itemsize


def weight_bytes(engine: Engine) -> int:
    seen, total = set(), 0
    for p in engine.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def run_parity(engine: Engine, prompts, max_tokens: list[int], clock: Clock, temperature: float = 0.0) -> dict:
    """Drive the engine through add_request/step, sampling KV-cache occupancy every 4 steps. Wall time is split
    between steps where every running sequence decodes (CUDA-graph steps) and steps that also prefill."""
    bm, sched = engine.scheduler.block_manager, engine.scheduler
    allocated = used = peak_blocks = steps = decode_steps = 0
    decode_s = 0.0
    start = clock.now()
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(p, SamplingParams(temperature=temperature, max_tokens=m, ignore_eos=True, seed=i))
    outs = []
    while engine.has_unfinished():
        decoding = not sched.waiting and not any(s.in_prefill for s in sched.running)
        t0 = time.perf_counter()
        outs += engine.step()  # the sampler's device-to-host copy ends each step
        if decoding:
            decode_steps += 1
            decode_s += time.perf_counter() - t0
        steps += 1
        if steps % 4 == 0:
            allocated += sum(len(s.block_table) for s in sched.running) * bm.block_size
            used += sum(s.num_computed_tokens for s in sched.running)
            peak_blocks = max(peak_blocks, bm.num_used_blocks)
    elapsed = clock.now() - start
    produced = sum(len(o.output_ids) for o in outs)
    assert produced == sum(max_tokens), "every request must produce exactly max_tokens tokens"
    return {
        "output_tokens": produced,
        "seconds": elapsed,
        "output_tok_s": produced / elapsed,
        "total_tok_s": (produced + sum(map(len, prompts))) / elapsed,
        "steps": steps,
        "decode_steps": decode_steps,
        "decode_s": decode_s,
        "kv_waste": 1 - used / allocated if allocated else None,  # allocated-but-unused slots / allocated
        "kv_peak_used_gib": peak_blocks * bm.block_size * kv_bytes_per_token(engine) / 2**30,
        "kv_pool_gib": bm.num_blocks * bm.block_size * kv_bytes_per_token(engine) / 2**30,
    }


def start_decoding(engine: Engine, batch: int, context: int) -> None:
    """Admit `batch` prompts of `context` tokens, long-lived, and step until every one is decoding."""
    vocab, room = engine.model_config.vocab_size, engine.max_model_len - context
    for p in random_prompts(batch, vocab, context, context, seed=1000 + batch):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=room, ignore_eos=True))
    sched = engine.scheduler
    while sched.waiting or any(s.in_prefill for s in sched.running):
        engine.step()
    assert len(sched.running) == batch


def decode_timing(engine: Engine, batch: int, context: int, steps: int, copy_bw: float | None, clock: Clock) -> dict:
    """Decode steps of `batch` sequences at `context` tokens: whole engine step (host + GPU) and graph replay."""
    sched = engine.scheduler
    start_decoding(engine, batch, context)
    start = clock.now()
    for _ in range(steps):
        engine.step()
    # no sync at the end: step() returned its results, so its GPU work is done; a look-ahead step queued
    # after it (async scheduling) is the next step's, not this one's
    step_s = (time.perf_counter() - start) / steps
    assert len(sched.running) == batch
    ctx = statistics.mean(s.num_computed_tokens for s in sched.running)
    row = {"batch": batch, "context": round(ctx), "engine_step_ms": step_s * 1e3}
    graphs = engine.runner.graphs
    if graphs is not None:
        graph = graphs.graphs[graphs.padded_size(batch)]  # its inputs are still those of the last step
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start_ev.record()
        for _ in range(20):
            graph.replay()
        end_ev.record()
        torch.cuda.synchronize()
        replay_s = start_ev.elapsed_time(end_ev) / 20 / 1e3
        row["graph_replay_ms"] = replay_s * 1e3
        if copy_bw:
            roof_s = (weight_bytes(engine) + batch * ctx * kv_bytes_per_token(engine)) / copy_bw
            row["roofline_ms"] = roof_s * 1e3
            row["pct_of_roofline"] = 100 * roof_s / replay_s
            row["pct_of_roofline_engine_step"] = 100 * roof_s / step_s
            row["roofline_tok_s"] = batch / roof_s
        row["decode_tok_s"] = batch / step_s
    engine.abort_all()
    return row


def profile_steps(engine: Engine, out: Path, batch: int, context: int) -> None:
    """GPU time per kernel (torch.profiler) and host time per function (cProfile): decode steps at `batch`,
    then the first mixed prefill+decode steps of a workload-A-like queue."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    report = []
    start_decoding(engine, batch, context)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
    report.append(f"=== GPU, 5 decode steps, batch {batch}, context {context}\n"
                  + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    prof_host = cProfile.Profile()
    prof_host.enable()
    for _ in range(10):
        engine.step()
    prof_host.disable()
    text = io.StringIO()
    pstats.Stats(prof_host, stream=text).sort_stats("tottime").print_stats(25)
    report.append(f"=== host, 10 decode steps, batch {batch}\n{text.getvalue()}")
    engine.abort_all()
    for p in random_prompts(128, engine.model_config.vocab_size, 100, min(1024, engine.max_model_len // 2), seed=77):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for _ in range(4):  # let some sequences start decoding next to the prefill chunks
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            engine.step()
    report.append("=== GPU, 4 mixed prefill+decode steps (8192-token budget)\n"
                  + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    engine.abort_all()
    (out / "profile.txt").write_text("\n\n".join(report))


def time_to_first_token(engine: Engine, length: int, clock: Clock) -> float:
    times = []
    for seed in range(3):
        prompt = random_prompts(1, engine.model_config.vocab_size, length, length, seed=5000 + seed)[0]
        start = clock.now()
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        times.append(clock.now() - start)
    return statistics.median(times)


def parity_suite(path: Path, args, prompts, lens_b, clock: Clock, copy_bw, full: bool) -> dict:
    reset_peak(clock.device)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(path, device=args.device, dtype="bf16", max_num_seqs=args.max_num_seqs,
                                    max_model_len=args.max_model_len)
    res = {"load_and_capture_s": time.perf_counter() - t0, "weight_gib": weight_bytes(engine) / 2**30}
    warm = random_prompts(8, engine.model_config.vocab_size, 20, min(300, args.max_model_len // 2), seed=7)
    run_parity(engine, warm, [16] * len(warm), clock)  # compiles every kernel variant
    res["A"] = run_parity(engine, prompts, [args.output_len] * len(prompts), clock)
    res["peak_gib_A"] = peak_memory(clock.device)
    if full:
        res["B"] = run_parity(engine, prompts, lens_b, clock)
        res["decode"] = [decode_timing(engine, b, args.decode_context, args.decode_steps, copy_bw, clock)
                         for b in args.decode_batches]
        res["ttft_s"] = time_to_first_token(engine, args.decode_context, clock)
        if args.profile:
            profile_steps(engine, args.out, max(args.decode_batches), args.decode_context)
    del engine
    return res


# ------------------------------------------------------------------------------------------- HF peers
def load_hf(path: Path, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                                 attn_implementation="sdpa").to(device).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, like parity's ignore_eos
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def hf_padded(model, prompts, new_tokens: int, batch: int, clock: Clock) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=None)

    def run(chunk, cfg):
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=cfg)
        return (out.shape[1] - width) * len(chunk)

    run(prompts[:4], GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None))
    start = clock.now()
    produced = sum(run(prompts[i : i + batch], config) for i in range(0, len(prompts), batch))
    elapsed = clock.now() - start
    return {"prompts": len(prompts), "output_tokens": produced, "seconds": elapsed, "output_tok_s": produced / elapsed}


def hf_continuous(model, prompts, new_tokens: int, clock: Clock) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(inputs=prompts[:4], generation_config=GenerationConfig(
        max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0))
    start = clock.now()
    out = model.generate_batch(inputs=prompts, generation_config=config)
    elapsed = clock.now() - start
    produced = sum(len(r.generated_tokens) for r in out.values())
    return {"prompts": len(prompts), "output_tokens": produced, "seconds": elapsed, "output_tok_s": produced / elapsed}


def hf_suite(path: Path, args, prompts, clock: Clock, deadline: float) -> dict:
    res = {}
    reset_peak(clock.device)
    model = load_hf(path, args.device)
    subset = prompts[: args.hf_prompts]
    peers = {"hf_padded": lambda m: hf_padded(m, subset, args.output_len, args.hf_batch, clock),
             "hf_continuous": lambda m: hf_continuous(m, subset, args.output_len, clock)}
    for name, fn in peers.items():
        if time.perf_counter() > deadline:
            res[name] = {"skipped": "out of time"}
            continue
        reset_peak(clock.device)
        try:
            res[name] = fn(model)
            res[name]["peak_gib"] = peak_memory(clock.device)
        except Exception as exc:  # a peer's API drift must not lose parity's numbers
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, res[name], flush=True)
    del model
    return res


# ----------------------------------------------------------------------------------- kernel timings
def kernel_timings(device: torch.device) -> list[dict]:
    """Before (torch reference ops) / after (Triton or the new path) at decode-256 and prefill-8192 sizes."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    from parity.kernels import reference
    from parity.kernels.metadata import AttentionMetadata
    from parity.kernels.triton import attention as triton_attention
    from parity.kernels.triton import elementwise as triton_elementwise
    from parity.kernels.triton import fast as triton_fast
    from parity.kernels.triton import norm as triton_norm
    from parity.kernels.triton import sampling as triton_sampling

    def bench(fn, *args):
        return do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median") * 1e3  # microseconds

    def pair(op, before, after, *args):
        rows.append({"op": op, "before_us": bench(before, *args), "after_us": bench(after, *args)})

    rows, bf16 = [], torch.bfloat16
    for tokens in (256, 8192):
        x = torch.randn(tokens, 1024, device=device, dtype=bf16)
        w = torch.rand(1024, device=device, dtype=bf16) + 0.5
        pair(f"rms_norm+residual T={tokens}", reference.rms_norm, triton_norm.rms_norm, x, w, 1e-6, torch.randn_like(x))
        qkv = torch.randn(tokens, 4096, device=device, dtype=bf16)
        q, k = qkv[:, :2048].view(tokens, 16, 128), qkv[:, 2048:3072].view(tokens, 8, 128)
        cos, sin = torch.rand(tokens, 128, device=device, dtype=bf16), torch.rand(tokens, 128, device=device, dtype=bf16)
        pair(f"rotary q+k T={tokens}", reference.apply_rotary, triton_elementwise.apply_rotary, q, k, cos, sin)
        gate_up = torch.randn(tokens, 6144, device=device, dtype=bf16)
        pair(f"silu_and_mul T={tokens}", reference.silu_and_mul, triton_elementwise.silu_and_mul, gate_up)
    hidden = torch.randn(256, 1024, device=device, dtype=bf16)
    head = torch.randn(151936, 1024, device=device, dtype=bf16) * 0.02
    pair("fp32 LM head B=256 V=151936 (upcast copy -> fp32-out GEMM)",
         lambda h, w: F.linear(h.float(), w.float()), triton_fast.mm_fp32_out, hidden, head)
    logprobs = torch.log_softmax(torch.randn(256, 151936, device=device), -1)
    seeds = torch.arange(256, device=device) * 7919
    steps = torch.full((256,), 100, device=device)
    pair("Gumbel sampling B=256 V=151936 (torch -> fused)", reference.gumbel_argmax, triton_sampling.gumbel_argmax,
         logprobs, seeds, steps)
    # decode attention alone: bytes of K/V read against the copy bandwidth
    for batch in (1, 256):
        blocks = batch * 64
        kc = torch.randn(blocks, 16, 8, 128, device=device, dtype=bf16)
        vc = torch.randn_like(kc)
        lens = torch.full((batch,), 1024, dtype=torch.int32, device=device)
        tables = torch.randperm(blocks, device=device).to(torch.int32).view(batch, 64)
        starts = torch.arange(batch + 1, dtype=torch.int32, device=device)
        meta = AttentionMetadata(starts, lens, 1, 1024, list(range(batch + 1)), [1024] * batch, tables)
        qd = torch.randn(batch, 16, 128, device=device, dtype=bf16)
        us = bench(triton_attention.paged_attention, qd, kc, vc, meta, 128**-0.5)
        rows.append({"op": f"decode attention B={batch} ctx=1024 (one layer)", "after_us": us,
                     "GB_s": 2 * kc.numel() * 2 / us / 1e3})
    return rows


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = workload_parser(__doc__, "tiny model on CPU, to check the script")
    ap.add_argument("--hf-prompts", type=int, default=64, help="HF peers run on the first N prompts (they are slow)")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32, 128, 256])
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--skip", nargs="*", default=[], choices=["hf", "kernels", "1.5b"])
    ap.add_argument("--profile", action="store_true", help="write profile.txt: kernel and host time of some steps")
    ap.add_argument("--time-budget", type=float, default=500.0, help="seconds; later parts are skipped past it")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    deadline = t_start + args.time_budget
    specs = {"qwen3-0.6b": QWEN3_06B, "qwen2.5-1.5b": QWEN25_15B}
    if args.smoke:
        args.device = "cpu"
        args.num_prompts, args.output_len, args.hf_prompts, args.hf_batch = 6, 8, 4, 4
        args.decode_batches, args.decode_context, args.decode_steps = [1, 4], 64, 2
        args.max_num_seqs, args.max_model_len = 8, 256
        args.skip = ["kernels", "1.5b"]
        specs = {"smoke": SMOKE}
    else:
        args.device = "cuda"
    device = torch.device(args.device)
    clock = Clock(device)
    results: dict = run_env(device, args)
    if device.type == "cuda":
        import triton

        results["triton"] = triton.__version__
        results["copy_bandwidth_GB_s"] = copy_bandwidth(device) / 1e9
        print("copy bandwidth GB/s", results["copy_bandwidth_GB_s"], flush=True)
    copy_bw = results.get("copy_bandwidth_GB_s", 0) * 1e9 or None
    if "kernels" not in args.skip:
        results["kernels"] = kernel_timings(device)
        for row in results["kernels"]:
            print(row, flush=True)
        reset_peak(device)

    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, spec) in enumerate(specs.items()):
            if i > 0 and ("1.5b" in args.skip or time.perf_counter() > deadline - 60):
                results[name] = {"skipped": "--skip or out of time"}
                continue
            t0 = time.perf_counter()
            path = write_tiny_model(Path(tmp) / name, spec if args.device == "cuda" else replace(spec, init_device="cpu"))
            vocab = json.loads((path / "config.json").read_text())["vocab_size"]
            prompts = random_prompts(args.num_prompts, vocab, *((100, 1024) if not args.smoke else (10, 40)), seed=0)
            lens_b = output_lengths(args.num_prompts, *((100, 1024) if not args.smoke else (4, 12)), seed=1)
            res = {"spec": asdict(spec), "write_model_s": time.perf_counter() - t0}
            res["parity"] = parity_suite(path, args, prompts, lens_b, clock, copy_bw, full=(i == 0))
            print(name, "parity", json.dumps(res["parity"], indent=1), flush=True)
            if i == 0 and "hf" not in args.skip:
                res.update(hf_suite(path, args, prompts, clock, deadline))
            results[name] = res
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["wall_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(results, indent=1))
    print(summary(results))


def summary(results: dict) -> str:
    lines = []
    for name, res in results.items():
        if not isinstance(res, dict) or "parity" not in res:
            continue
        p = res["parity"]
        lines.append(f"## {name}")
        lines.append("| system | prompts | output tok/s | vs HF CB | peak GiB |")
        lines.append("|---|---|---|---|---|")
        cb = res.get("hf_continuous", {}).get("output_tok_s")
        rows = [("parity (CUDA graphs) A", results["args"]["num_prompts"], p["A"]["output_tok_s"], p.get("peak_gib_A"))]
        if "B" in p:
            rows.append(("parity B", results["args"]["num_prompts"], p["B"]["output_tok_s"], None))
        for peer in ("hf_padded", "hf_continuous"):
            if "output_tok_s" in res.get(peer, {}):
                rows.append((f"{peer} A", res[peer]["prompts"], res[peer]["output_tok_s"], res[peer].get("peak_gib")))
            elif peer in res:
                rows.append((f"{peer} A: {res[peer]}", "-", float("nan"), None))
        for label, n, tps, peak in rows:
            ratio = f"{tps / cb:.1f}x" if cb else "-"
            lines.append(f"| {label} | {n} | {tps:,.0f} | {ratio} | {peak if peak is None else round(peak, 1)} |")
        waste = p["A"]["kv_waste"]
        lines.append(f"KV waste A: {waste and 100 * waste:.3g}%  TTFT(1024): {p.get('ttft_s', float('nan')) * 1e3:.1f} ms")
        for row in p.get("decode", []):
            lines.append("decode " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
