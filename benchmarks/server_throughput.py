"""`parity serve` throughput under 64-256 concurrent OpenAI clients, against offline `Engine.generate` on the
same prompts, same model, same KV-cache size, same GPU.

Model: random init with Qwen3-0.6B's shapes, bf16, written by parity's factory (or --model). Workload: N
prompts of random token ids, input lengths U[100, 1024], output lengths U[100, 512], EOS ignored,
temperature 1 with a seed per prompt. Offline: one `generate` call on all of them (after a warm-up) with
at most C sequences running (max_num_seqs = C), the cap C clients put on the server. Server: `parity
serve` as a user runs it (its HTTP process and its engine process: everything a client pays for;
--engine-in-process for the single-process layout, the engine on a thread of the HTTP process); the clients
(`openai.AsyncOpenAI`, spread over --client-procs processes) keep C requests in flight until all N are done,
as token-id prompts with `return_token_ids`, non-streaming and streaming. Reported: output tokens/s, the ratio to
offline at the same C (target >= 0.9), request latency p50/p90, and how many samples equal the offline
tokens (fast mode may differ by batch composition; --deterministic makes them equal).

  python -m benchmarks.server_throughput --out $OUT          # on the GPU (a few minutes on an H200)
  python -m benchmarks.server_throughput --smoke --out /tmp/st  # tiny model on CPU: checks the script only
  python -m benchmarks.server_throughput --cpu --num-prompts 32 --concurrency 16 --client-procs 1 --out /tmp/st
                                         # a 6-layer model on CPU, where the step is not negligible

The JSON is rewritten after each row, so a run cut by a time limit keeps what it measured.

The GPU image lacks fastapi, uvicorn, pydantic and openai: their wheels travel in .whl/serve (docs/server.md).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import torch

from benchmarks.common import free_memory, run_env
from parity import Engine, SamplingParams
from parity.testing.factory import TinyModelSpec, write_tiny_model

QWEN3_06B = TinyModelSpec(
    architecture="qwen3", hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
    head_dim=128, padded_vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
    initializer_range=0.02, init_device="cuda", save_dtype="bfloat16",
)
SMOKE = TinyModelSpec(architecture="qwen3", padded_vocab_size=1000, initializer_range=0.02)
# A CPU model whose engine step is not negligible next to the HTTP work (for profiling the server on CPU).
CPU = TinyModelSpec(architecture="qwen3", hidden_size=256, intermediate_size=768, num_layers=6, num_heads=4,
                    num_kv_heads=2, padded_vocab_size=4096, initializer_range=0.02)
MODEL_NAME = "bench"


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @classmethod
    def random(cls, n: int, vocab: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int):
        rng = np.random.default_rng(seed)
        lens = rng.integers(prompt_range[0], prompt_range[1] + 1, size=n)
        prompts = [rng.integers(0, vocab, size=int(k)).tolist() for k in lens]
        outs = rng.integers(output_range[0], output_range[1] + 1, size=n).tolist()
        return cls(prompts, [int(k) for k in outs])

    def params(self, i: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens[i], temperature=1.0, seed=i, ignore_eos=True)


@dataclass
class RunResult:
    system: str
    concurrency: int | None
    stream: bool | None
    seconds: float
    output_tokens: int
    tokens_per_s: float
    ratio_to_offline: float | None = None
    latency_p50_s: float | None = None
    latency_p90_s: float | None = None
    equal_to_offline: int | None = None
    num_requests: int = 0


def engine_options(args, max_num_seqs: int) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=max_num_seqs,
                kv_cache_memory=int(args.kv_cache_gb * 2**30), deterministic=args.deterministic)


def run_offline(model: str, work: Workload, args, max_num_seqs: int) -> tuple[RunResult, list[list[int]]]:
    """One generate() over every prompt with at most `max_num_seqs` running: the same cap C clients put on
    the server, so the two batch alike."""
    engine = Engine.from_pretrained(model, **engine_options(args, max_num_seqs))
    engine.generate(work.prompts[:8], [SamplingParams(max_tokens=8, ignore_eos=True)] * 8)  # warm-up (graphs, kernels)
    device = engine.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    rollouts = engine.generate(work.prompts, [work.params(i) for i in range(len(work.prompts))])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.output_ids) for r in rollouts)
    del engine
    free_memory(device)
    return RunResult("offline generate", max_num_seqs, None, seconds, tokens, tokens / seconds, 1.0,
                     num_requests=len(rollouts)), [r.output_ids for r in rollouts]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, args, log: Path) -> subprocess.Popen:
    opts = engine_options(args, max(args.concurrency))
    cmd = [sys.executable, "-m", "parity.cli.main", "serve", model, "--port", str(port), "--served-model-name", MODEL_NAME,
           "--dtype", opts["dtype"], "--max-num-seqs", str(opts["max_num_seqs"]), "--kv-cache-memory",
           str(opts["kv_cache_memory"]), "--log-level", "warning"]
    if opts["device"]:
        cmd += ["--device", opts["device"]]
    if opts["max_model_len"]:
        cmd += ["--max-model-len", str(opts["max_model_len"])]
    if opts["deterministic"]:
        cmd.append("--deterministic")
    if args.engine_in_process:
        cmd.append("--engine-in-process")
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"the server did not answer /health within 600 s; see {log}")


async def one_request(client: openai.AsyncOpenAI, work: Workload, i: int, stream: bool) -> list[int]:
    kwargs = dict(model=MODEL_NAME, prompt=work.prompts[i], max_tokens=work.max_tokens[i], temperature=1.0, seed=i,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    if not stream:
        r = await client.completions.create(**kwargs)
        return r.choices[0].token_ids
    ids: list[int] = []
    async for chunk in await client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            ids += c.token_ids
    return ids


async def run_clients(url: str, work: Workload, indices: list[int], concurrency: int, stream: bool
                      ) -> tuple[float, float, list[float], dict[int, list[int]]]:
    """Keep `concurrency` requests in flight until the prompts `indices` are done; return start and end times
    (time.time, comparable across processes), latencies and outputs."""
    outputs: dict[int, list[int]] = {}
    latencies: list[float] = []
    todo = iter(indices)
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600) as client:
        async def worker():
            for i in todo:
                t0 = time.perf_counter()
                outputs[i] = await one_request(client, work, i, stream)
                latencies.append(time.perf_counter() - t0)

        start = time.time()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return start, time.time(), latencies, outputs


def client_process(url: str, work: Workload, indices: list[int], concurrency: int, stream: bool, start_at: float):
    time.sleep(max(0.0, start_at - time.time()))  # every client process starts together
    return asyncio.run(run_clients(url, work, indices, concurrency, stream))


def run_load(pool: concurrent.futures.ProcessPoolExecutor, procs: int, url: str, work: Workload, concurrency: int,
             stream: bool) -> tuple[float, list[float], list]:
    """`concurrency` clients spread over `procs` processes, so parsing responses (a chunk per token when
    streaming) does not make one client process the bottleneck; return wall time, latencies, outputs."""
    procs = max(1, min(procs, concurrency))
    shares = [list(range(len(work.prompts)))[k::procs] for k in range(procs)]
    per_proc = [concurrency // procs + (k < concurrency % procs) for k in range(procs)]
    start_at = time.time() + 0.5
    parts = list(pool.map(client_process, [url] * procs, [work] * procs, shares, per_proc, [stream] * procs,
                          [start_at] * procs))
    outputs: dict[int, list[int]] = {}
    latencies: list[float] = []
    for _, _, lat, outs in parts:
        latencies += lat
        outputs.update(outs)
    return max(p[1] for p in parts) - start_at, latencies, [outputs[i] for i in range(len(work.prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few prompts: checks the script only")
    parser.add_argument("--cpu", action="store_true", help="a 6-layer hidden-256 model on CPU (profiling on CPU)")
    parser.add_argument("--model", help="model directory (default: Qwen3-0.6B shapes written by the factory)")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--client-procs", type=int, default=4, help="client processes sharing the concurrency")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gb", type=float, default=40.0, help="the same KV cache for offline and server")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--engine-in-process", action="store_true",
                        help="serve with the engine on a thread of the HTTP process (the layout before the engine process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    prompt_range, output_range = (100, 1024), (100, 512)
    spec = QWEN3_06B
    if args.smoke:
        spec, args.num_prompts, args.concurrency = SMOKE, 12, [4, 8]
        args.dtype, args.device, args.max_model_len, args.kv_cache_gb = "fp32", "cpu", 256, 0.05
        prompt_range, output_range = (4, 40), (2, 12)
    elif args.cpu:
        spec, args.dtype, args.device, args.max_model_len, args.kv_cache_gb = CPU, "fp32", "cpu", 512, 0.25
        prompt_range, output_range = (16, 128), (16, 96)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory()
    model = args.model or str(write_tiny_model(Path(tmp.name) / "model", spec))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    work = Workload.random(args.num_prompts, vocab, prompt_range, output_range, args.seed)
    env = run_env(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args)

    results, offline = [], {}
    out = args.out / "server_throughput.json"

    def record(r: RunResult) -> None:
        """Keep the row and rewrite the JSON, so a run cut by a time limit keeps what it measured."""
        results.append(r)
        out.write_text(json.dumps({"env": env, "engine_in_process": args.engine_in_process,
                                   "workload": {"num_prompts": args.num_prompts, "prompt_lengths": prompt_range,
                                                "output_lengths": output_range},
                                   "results": [asdict(x) for x in results]}, indent=2))

    for c in args.concurrency:
        offline[c] = run_offline(model, work, args, c)
        r = offline[c][0]
        record(r)
        print(f"offline generate, max_num_seqs={c}: {r.tokens_per_s:,.0f} tok/s ({r.output_tokens} tokens, {r.seconds:.2f} s)",
              flush=True)
    port = free_port()
    server = start_server(model, port, args, args.out / "server_throughput_server.log")
    try:
        url = f"http://127.0.0.1:{port}/v1"
        pool = concurrent.futures.ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
        warm = Workload(work.prompts[:args.client_procs * 2], [8] * args.client_procs * 2)
        run_load(pool, args.client_procs, url, warm, args.client_procs * 2, False)  # imports, connections, graphs
        for stream in (False, True):
            for c in args.concurrency:
                seconds, lat, outs = run_load(pool, args.client_procs, url, work, c, stream)
                tokens = sum(len(o) for o in outs)
                lat.sort()
                reference, reference_ids = offline[c]
                r = RunResult("parity serve", c, stream, seconds, tokens, tokens / seconds,
                              (tokens / seconds) / reference.tokens_per_s, statistics.median(lat),
                              lat[int(0.9 * (len(lat) - 1))], sum(o == w for o, w in zip(outs, reference_ids)), len(outs))
                record(r)
                print(f"serve c={c:4d} stream={stream!s:5}: {r.tokens_per_s:,.0f} tok/s = {r.ratio_to_offline:.3f}x offline, "
                      f"p50 {r.latency_p50_s:.2f} s, equal to offline {r.equal_to_offline}/{r.num_requests}", flush=True)
        pool.shutdown()
    finally:
        server.terminate()
        server.wait(60)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
