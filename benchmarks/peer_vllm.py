"""parity beside vLLM on one GPU: same HF-written model, same prompts, each system in its own process, one
after the other; one table with the ratios.

Rows: workload A (256 prompts U[100, 1024], 512 greedy tokens each, EOS ignored), workload B (the same
prompts, output lengths U[100, 1024], T=0.6), batch 1 (one 1024-token prompt, 512 greedy tokens: ms per
token after the first) and the time to first token of an uncached 1024-token prompt (median of 3, each a
fresh prompt, whole generate call). Columns: max_model_len 2048 and 8192; parity's fast mode against vLLM,
parity's deterministic mode against vLLM with `VLLM_BATCH_INVARIANT=1`. Workloads and the model shapes
are benchmarks/throughput.py's. Where vLLM cannot be imported the table says so and parity runs alone.

  python -m benchmarks.peer_vllm --out DIR --vllm-path /tmp/vsite     # on the GPU (vLLM per ../shared/peers/vllm)
  python -m benchmarks.peer_vllm --smoke --out /tmp/pv                # tiny model on CPU: checks the script only

Each configuration runs in a fresh subprocess (`--worker`), so neither system sees the other's memory,
compile caches or CUDA context; the driver itself never touches the GPU. Results: DIR/peer_vllm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks import throughput
from benchmarks.common import run_worker, workload_parser
from benchmarks.throughput import LONG_CONTEXT_SPECS, SMOKE, output_lengths, random_prompts

REPO = Path(__file__).resolve().parents[1]

VLLM_SETTINGS = dict(skip_tokenizer_init=True, dtype="bfloat16", gpu_memory_utilization=0.85, max_num_seqs=256, seed=0)
B_TEMPERATURE = 0.6


# ------------------------------------------------------------------------------------- one system, one process
def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _latency(generate_one, vocab: int, prompt_len: int, new_tokens: int) -> dict:
    """TTFT of fresh (uncached) prompts, median of 3, and decode ms per token from one longer generation."""
    fresh = random_prompts(4, vocab, prompt_len, prompt_len, seed=5000)
    ttft = statistics.median(_timed(lambda p=p: generate_one(p, 1)) for p in fresh[:3])
    whole = _timed(lambda: generate_one(fresh[3], new_tokens))
    return {"ttft_ms": ttft * 1e3, "batch1_ms_per_token": (whole - ttft) / (new_tokens - 1) * 1e3}


def run_vllm(job: dict, prompts, lens_b) -> dict:
    if job["mode"] == "deterministic":
        os.environ["VLLM_BATCH_INVARIANT"] = "1"  # before vLLM is imported
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    settings = dict(VLLM_SETTINGS, max_model_len=job["max_model_len"])
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], **settings)
    res = {"version": vllm.__version__, "settings": settings, "init_s": time.perf_counter() - t0,
           "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}
    try:
        sched = llm.llm_engine.vllm_config.scheduler_config
        res["max_num_batched_tokens"] = sched.max_num_batched_tokens
    except AttributeError:
        pass

    def generate(ids: list[list[int]], params) -> int:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def greedy(n: int):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)

    generate(prompts[:8], greedy(16))  # warm-up
    res["A"] = _throughput(lambda: generate(prompts, greedy(job["output_len"])))
    b_params = [SamplingParams(temperature=B_TEMPERATURE, max_tokens=m, ignore_eos=True, detokenize=False, seed=i)
                for i, m in enumerate(lens_b)]
    res["B"] = _throughput(lambda: generate(prompts, b_params))
    res.update(_latency(lambda p, n: generate([p], greedy(n)), job["vocab"], job["latency_prompt_len"],
                        job["latency_new_tokens"]))
    return res


def _throughput(run) -> dict:
    start = time.perf_counter()
    produced = run()
    seconds = time.perf_counter() - start
    return {"output_tokens": produced, "seconds": seconds, "output_tok_s": produced / seconds}


def run_parity(job: dict, prompts, lens_b) -> dict:
    import torch

    from parity import Engine, SamplingParams

    device = torch.device(job["device"])
    clock = throughput.Clock(device)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(job["model"], device=job["device"], dtype="bf16",
                                    deterministic=job["mode"] == "deterministic", max_num_seqs=job["max_num_seqs"],
                                    max_model_len=job["max_model_len"], kv_cache_memory=job.get("kv_cache_memory"),
                                    **({"max_num_batched_tokens": n} if (n := job["parity_batched_tokens"]) else {}))
    res = {"init_s": time.perf_counter() - t0, "settings": {k: job[k] for k in ("max_num_seqs", "max_model_len")},
           "max_num_batched_tokens": engine.config.max_num_batched_tokens}
    # Warm-up on other prompts (no prefix-cache hits later): full-size prefill chunks and sampling at B's
    # temperature, so that no kernel variant compiles inside a timed run.
    warm = random_prompts(min(64, len(prompts)), job["vocab"], *((100, 1024) if job["device"] == "cuda" else (10, 40)),
                          seed=99)
    throughput.run_parity(engine, warm, [8] * len(warm), clock)
    throughput.run_parity(engine, warm[:8], [8] * len(warm[:8]), clock, temperature=B_TEMPERATURE)
    if not job.get("latency_only"):
        res["A"] = throughput.run_parity(engine, prompts, [job["output_len"]] * len(prompts), clock)
        res["B"] = throughput.run_parity(engine, prompts, lens_b, clock, temperature=B_TEMPERATURE)

    def generate_one(prompt: list[int], n: int) -> None:
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        clock.now()

    res.update(_latency(generate_one, job["vocab"], job["latency_prompt_len"], job["latency_new_tokens"]))
    res["ttft_host_profile"] = _host_profile(lambda: generate_one(
        random_prompts(1, job["vocab"], job["latency_prompt_len"], job["latency_prompt_len"], seed=6000)[0], 1))
    if device.type == "cuda":
        res["alloc_retries"] = torch.cuda.memory_stats(device).get("num_alloc_retries")
        # whole engine step against the CUDA graph's replay alone, at batch 1 and at the largest batch
        batches = (1,) if job.get("latency_only") else (1, job["max_num_seqs"])
        res["decode"] = [throughput.decode_timing(engine, b, job["latency_prompt_len"], 16, None, clock)
                         for b in batches]
    return res


def _host_profile(fn, top: int = 20) -> str:
    """cProfile of one call: where the host's time goes (the functions with the most own time)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def write_model(job: dict) -> dict:
    """Writes the HF-format model (in its own process: the driver never holds GPU memory) and the run header."""
    import torch

    from benchmarks.common import run_env
    from parity.testing.factory import TinyModelSpec, write_tiny_model

    spec = TinyModelSpec(**job["spec"])
    if job["device"] == "cpu":
        spec = replace(spec, init_device="cpu")
    write_tiny_model(Path(job["model"]), spec)
    env = run_env(job["device"])
    if job["device"] == "cuda":
        import triton

        env["triton"] = triton.__version__
        env["copy_bandwidth_GB_s"] = throughput.copy_bandwidth(torch.device("cuda")) / 1e9
    return env


def worker(job: dict) -> None:
    out = Path(job["result"])
    if job["system"] == "write":
        out.write_text(json.dumps(write_model(job)))
        return
    data = json.loads(Path(job["prompts"]).read_text())
    run = run_vllm if job["system"] == "vllm" else run_parity
    out.write_text(json.dumps(run(job, data["prompts"], data["lens_b"])))


# ------------------------------------------------------------------------------------------------ driver
def vllm_missing(vllm_path: str | None) -> str | None:
    """Why vLLM cannot run here (None if it can): asked of a subprocess with the vLLM path, as the workers see it."""
    env = _env(vllm_path)
    probe = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["import failed"])[-1]


def _env(vllm_path: str | None) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_BATCH_INVARIANT", None)
    if vllm_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (vllm_path, env.get("PYTHONPATH")) if p)
    return env


def spawn(job: dict, tmp: Path, vllm_path: str | None, timeout: float) -> dict:
    """Runs one job in a fresh interpreter; its result, or what went wrong."""
    job = dict(job, result=str(tmp / f"result-{time.monotonic_ns()}.json"))
    env = _env(vllm_path if job["system"] == "vllm" else None)
    t0 = time.perf_counter()
    run = run_worker([sys.executable, "-m", "benchmarks.peer_vllm", "--worker", json.dumps(job)], env, timeout,
                     Path(job["result"]).with_suffix(".log"), cwd=REPO)
    if run.returncode is None:
        return {"error": f"timed out after {timeout:.0f} s{run.leftovers}"}
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        return {"error": run.output.strip()[-3000:], "wall_s": wall}
    res = json.loads(Path(job["result"]).read_text())
    if isinstance(res, dict):
        res["wall_s"] = wall
    return res


def prepare(tmp: Path, spec, device: str, smoke: bool, num_prompts: int, output_len: int,
            parity_batched_tokens: int | None) -> tuple[dict, dict]:
    """Writes the model (in a process of its own) and the prompts under `tmp`: (the run header, or what went wrong;
    the job fields every run on them shares). Prompts U[100, 1024] (smoke: U[10, 40]); the latency rows' prompt
    1024 tokens and 512 new ones (smoke: 32 and 6)."""
    lo, hi, latency_len, latency_new = (10, 40, 32, 6) if smoke else (100, 1024, 1024, 512)
    model = tmp / "model"
    env = spawn({"system": "write", "spec": asdict(spec), "model": str(model), "device": device}, tmp, None,
                timeout=600)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = random_prompts(num_prompts, vocab, lo, hi, seed=0)
    lens_b = output_lengths(num_prompts, *((4, 12) if smoke else (100, 1024)), seed=1)
    (tmp / "prompts.json").write_text(json.dumps({"prompts": prompts, "lens_b": lens_b}))
    common = {"model": str(model), "prompts": str(tmp / "prompts.json"), "device": device, "vocab": vocab,
              "output_len": output_len, "max_num_seqs": 8 if smoke else 256,
              "parity_batched_tokens": parity_batched_tokens,
              "latency_prompt_len": latency_len, "latency_new_tokens": latency_new}
    return env, common


def configurations(args, have_vllm: bool) -> list[dict]:
    """In order of importance (later ones are skipped when time runs out): vLLM and parity in fast mode at the
    longest max_model_len, parity fast at the others, then deterministic mode (only at `--deterministic-lens`,
    default the longest) beside vLLM's batch-invariant mode, then vLLM at the other lengths."""
    longest = max(args.max_model_lens)
    others = sorted(set(args.max_model_lens) - {longest}, reverse=True)
    order = [("vllm", "fast", longest), ("parity", "fast", longest)] + [("parity", "fast", n) for n in others]
    if "deterministic" in args.modes:
        for n in sorted(args.deterministic_lens or [longest], reverse=True):
            order += [("vllm", "deterministic", n), ("parity", "deterministic", n)]
    order += [("vllm", "fast", n) for n in others]
    return [{"system": s, "mode": m, "max_model_len": n} for s, m, n in order
            if (s != "vllm" or have_vllm) and (m in args.modes)]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict, lens: list[int], modes: list[str]) -> str:
    """Markdown: one row per measure, per (max_model_len, mode) the vLLM figure, parity's and parity ÷ vLLM
    (for latencies vLLM ÷ parity, so > 1 always means parity is better)."""
    measures = [("workload A, output tok/s", ("A", "output_tok_s"), ",.0f", True),
                ("workload B, output tok/s", ("B", "output_tok_s"), ",.0f", True),
                ("batch 1, ms per token", ("batch1_ms_per_token",), ".3f", False),
                ("TTFT, uncached 1024-token prompt, ms", ("ttft_ms",), ".1f", False)]
    peer = {"fast": "vLLM", "deterministic": "vLLM batch-invariant"}
    columns = [(n, mode) for n in lens for mode in modes if f"parity/{mode}/{n}" in results]
    head, rule = ["measure"], ["---"]
    for n, mode in columns:
        head += [f"{peer[mode]} @{n}", f"parity {mode} @{n}", "ratio"]
        rule += ["---"] * 3
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]

    def get(key, path):
        node = results.get(key, {})
        for p in path:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, (int, float)) else None

    for label, path, spec, higher_better in measures:
        row = [label]
        for n, mode in columns:
            v, p = get(f"vllm/{mode}/{n}", path), get(f"parity/{mode}/{n}", path)
            ratio = None if v is None or p is None else (p / v if higher_better else v / p)
            row += [_fmt(v, spec), _fmt(p, spec), "-" if ratio is None else f"{ratio:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = workload_parser(__doc__, "tiny model on CPU, parity alone: checks the script")
    ap.add_argument("--vllm-path", help="a folder to put first on vLLM workers' PYTHONPATH (e.g. /tmp/vsite)")
    ap.add_argument("--spec", choices=sorted(LONG_CONTEXT_SPECS), default="qwen3-0.6b")
    ap.add_argument("--max-model-lens", type=int, nargs="+", default=[8192, 2048])
    ap.add_argument("--modes", nargs="+", choices=["fast", "deterministic"], default=["fast", "deterministic"])
    ap.add_argument("--deterministic-lens", type=int, nargs="*",
                    help="max_model_lens that deterministic mode runs at (default: the longest)")
    ap.add_argument("--same-kv-pool", action="store_true",
                    help="also run parity fast at the longest max_model_len with the KV pool of the shortest")
    ap.add_argument("--parity-max-num-batched-tokens", type=int, default=None,
                    help="parity's prefill chunk (default: EngineConfig's, 8192; vLLM 0.20 picks 16384 on an H200)")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds; later configurations are skipped")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    t_start = time.perf_counter()
    deadline = t_start + args.time_budget
    spec = LONG_CONTEXT_SPECS[args.spec]
    device = "cuda"
    if args.smoke:
        spec, device = SMOKE, "cpu"
        args.num_prompts, args.output_len, args.max_model_lens = 6, 8, [128]
    args.out.mkdir(parents=True, exist_ok=True)
    missing = "--smoke runs parity alone" if args.smoke else vllm_missing(args.vllm_path)
    results: dict = {"vllm_absent": missing}
    print("vLLM:", missing or "present", flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        results["env"], common = prepare(tmp, spec, device, args.smoke, args.num_prompts, args.output_len,
                                         args.parity_max_num_batched_tokens)
        jobs = configurations(args, missing is None)
        for job in jobs:
            key = f"{job['system']}/{job['mode']}/{job['max_model_len']}"
            left = deadline - time.perf_counter()
            if left < 30:
                results[key] = {"skipped": "out of time"}
                continue
            results[key] = spawn({**common, **job}, tmp, args.vllm_path, timeout=left)
            print(key, json.dumps(results[key])[:1500], flush=True)
        if args.same_kv_pool and len(args.max_model_lens) > 1:
            short, long = min(args.max_model_lens), max(args.max_model_lens)
            pool = results.get(f"parity/fast/{short}", {}).get("A", {}).get("kv_pool_gib")
            left = deadline - time.perf_counter()
            if pool and left > 30:
                job = {"system": "parity", "mode": "fast", "max_model_len": long, "kv_cache_memory": int(pool * 2**30)}
                results[f"parity/fast/{long}/kv-pool-of-{short}"] = spawn({**common, **job}, tmp, None, timeout=left)
    results["spec"] = asdict(spec)
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["wall_s"] = time.perf_counter() - t_start
    (args.out / "peer_vllm.json").write_text(json.dumps(results, indent=1))
    versions = {r["version"] for r in results.values() if isinstance(r, dict) and "version" in r}
    print("vLLM:", missing or f"version {', '.join(sorted(versions))}, settings {VLLM_SETTINGS}")
    print(table(results, sorted(args.max_model_lens, reverse=True), args.modes))
    for key, res in results.items():  # where parity's workload-A time went
        if key.startswith("parity/") and isinstance(res, dict) and "A" in res:
            a = res["A"]
            print(f"{key}: A {a['output_tok_s']:,.0f} tok/s in {a['seconds']:.2f} s, {a['steps']} steps, "
                  f"{a['decode_steps']} decode-only steps took {a['decode_s']:.2f} s; KV pool {a['kv_pool_gib']:.1f} GiB, "
                  f"allocator retries {res.get('alloc_retries')}")


if __name__ == "__main__":
    main()
