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

The JSON is rewritten after each row and each phase, so a run cut by a time limit keeps what it measured. Every
phase (model write, each offline engine's load / warm-up / generate, server start until /health, client start-up,
each server row) prints a line with its seconds and lands in the JSON's "phases" with the GPU memory this process
still holds. The server log (server_throughput_server.log) holds both server processes' own lines: the engine
process's start-up seconds and readiness. When a row exceeds --row-timeout, the server does not answer within
--server-timeout, or the run is cut (SIGTERM, as from `timeout`), every thread's stack of the HTTP and engine
processes is dumped into the server log (SIGUSR1) before the server is stopped.

The GPU image lacks fastapi, uvicorn, pydantic and openai: their wheels travel in .whl/serve (docs/server.md).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import openai
import torch

from benchmarks.common import free_memory, proc_stats, run_env
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


@dataclass
class Phase:
    name: str
    seconds: float
    ended_at_s: float  # since the benchmark started
    gpu_memory: dict = field(default_factory=dict)  # what this process holds afterwards, and the device's free memory


def gpu_memory() -> dict:
    """GiB this process holds (allocated, reserved) and the device's free/total: whether the offline engines let go."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"allocated_gib": torch.cuda.memory_allocated() / 2**30, "reserved_gib": torch.cuda.memory_reserved() / 2**30,
            "device_free_gib": free / 2**30, "device_total_gib": total / 2**30}


class Phases:
    """Times each phase, prints a line for it, and calls `save` after it (the JSON keeps what was reached)."""

    def __init__(self, save):
        self.start = time.perf_counter()
        self.done: list[Phase] = []
        self.current: str | None = None
        self._save = save

    @contextmanager
    def __call__(self, name: str):
        self.current = name
        t0 = time.perf_counter()
        print(f"[{t0 - self.start:7.1f} s] {name} ...", flush=True)
        yield
        t1 = time.perf_counter()
        self.done.append(Phase(name, t1 - t0, t1 - self.start, gpu_memory()))
        self.current = None
        print(f"[{t1 - self.start:7.1f} s] {name}: {t1 - t0:.1f} s", flush=True)
        self._save()


def engine_options(args, max_num_seqs: int) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=max_num_seqs,
                kv_cache_memory=int(args.kv_cache_gb * 2**30), deterministic=args.deterministic)


def run_offline(model: str, work: Workload, args, max_num_seqs: int, phase: Phases
                ) -> tuple[RunResult, list[list[int]]]:
    """One generate() over every prompt with at most `max_num_seqs` running: the same cap C clients put on
    the server, so the two batch alike."""
    with phase(f"offline max_num_seqs={max_num_seqs}: Engine.from_pretrained"):
        engine = Engine.from_pretrained(model, **engine_options(args, max_num_seqs))
    device = engine.device
    with phase(f"offline max_num_seqs={max_num_seqs}: warm-up"):
        engine.generate(work.prompts[:8], [SamplingParams(max_tokens=8, ignore_eos=True)] * 8)  # graphs, kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with phase(f"offline max_num_seqs={max_num_seqs}: generate"):
        start = time.perf_counter()
        rollouts = engine.generate(work.prompts, [work.params(i) for i in range(len(work.prompts))])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    tokens = sum(len(r.output_ids) for r in rollouts)
    with phase(f"offline max_num_seqs={max_num_seqs}: free the engine"):
        del engine
        free_memory(device)
    return RunResult("offline generate", max_num_seqs, None, seconds, tokens, tokens / seconds, 1.0,
                     num_requests=len(rollouts)), [r.output_ids for r in rollouts]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, args, log: Path) -> subprocess.Popen:
    """`parity serve` with its output (both processes', unbuffered) in `log`, parity's start-up lines included."""
    opts = engine_options(args, max(args.concurrency))
    cmd = [sys.executable, "-m", "parity.cli.main", "serve", model, "--port", str(port), "--served-model-name", MODEL_NAME,
           "--dtype", opts["dtype"], "--max-num-seqs", str(opts["max_num_seqs"]), "--kv-cache-memory",
           str(opts["kv_cache_memory"]), "--log-level", "info", "--disable-access-log",
           "--engine-startup-timeout", str(args.server_timeout)]
    if opts["device"]:
        cmd += ["--device", opts["device"]]
    if opts["max_model_len"]:
        cmd += ["--max-model-len", str(opts["max_model_len"])]
    if opts["deterministic"]:
        cmd.append("--deterministic")
    if args.engine_in_process:
        cmd.append("--engine-in-process")
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + args.server_timeout + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    dump_stacks(proc)
    proc.kill()
    raise TimeoutError(f"the server did not answer /health within --server-timeout={args.server_timeout} s + 30; "
                       f"see {log}:\n{log.read_text()[-3000:]}")


def dump_stacks(server: subprocess.Popen) -> None:
    """SIGUSR1 to the server and its engine process: each writes every thread's stack into the server log."""
    if server.poll() is not None:
        return
    pids = [server.pid] + [pid for pid, _, ppid, _ in proc_stats() if ppid == server.pid and "spawn_main" in _cmdline(pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(2)  # the dumps are written by the processes themselves
    print(f"dumped the stacks of pids {pids} into the server log", flush=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


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
             stream: bool, timeout: float) -> tuple[float, list[float], list]:
    """`concurrency` clients spread over `procs` processes, so parsing responses (a chunk per token when
    streaming) does not make one client process the bottleneck; return wall time, latencies, outputs."""
    procs = max(1, min(procs, concurrency))
    shares = [list(range(len(work.prompts)))[k::procs] for k in range(procs)]
    per_proc = [concurrency // procs + (k < concurrency % procs) for k in range(procs)]
    start_at = time.time() + 0.5
    parts = list(pool.map(client_process, [url] * procs, [work] * procs, shares, per_proc, [stream] * procs,
                          [start_at] * procs, timeout=timeout))
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
    parser.add_argument("--server-timeout", type=float, default=600.0,
                        help="seconds the server's engine process may take to start (then: stacks dumped, error)")
    parser.add_argument("--row-timeout", type=float, default=300.0,
                        help="seconds one server row (or the client warm-up) may take (then: stacks dumped, error)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop cleanly after this many seconds (stacks dumped, server stopped, JSON says where); "
                             "set it below an outer time limit, whose SIGTERM also reaches the server")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    for name in ("server_timeout", "row_timeout", "budget_s"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(args, name)}")
    signal.signal(signal.SIGTERM, _stop_on_signal)  # a time limit's SIGTERM runs the finally blocks below
    if args.budget_s is not None:
        signal.signal(signal.SIGALRM, _stop_on_signal)
        signal.alarm(max(1, int(args.budget_s)))
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
    env = run_env(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args)
    results, offline = [], {}
    out = args.out / "server_throughput.json"

    def save() -> None:
        """Rewrite the JSON, so a run cut by a time limit keeps what it measured and where it was."""
        out.write_text(json.dumps({"env": env, "engine_in_process": args.engine_in_process,
                                   "workload": {"num_prompts": args.num_prompts, "prompt_lengths": prompt_range,
                                                "output_lengths": output_range},
                                   "results": [asdict(x) for x in results],
                                   "phases": [asdict(p) for p in phase.done], "cut_in_phase": phase.current},
                                  indent=2))

    def record(r: RunResult) -> None:
        results.append(r)
        save()

    phase = Phases(save)
    tmp = tempfile.TemporaryDirectory()
    with phase("write the model"):
        model = args.model or str(write_tiny_model(Path(tmp.name) / "model", spec))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    work = Workload.random(args.num_prompts, vocab, prompt_range, output_range, args.seed)

    try:
        serve_and_measure(args, model, work, offline, record, phase)
    finally:
        save()  # cut_in_phase: where an error or a time limit stopped it
    print(f"wrote {out}")


class Stopped(Exception):
    """SIGTERM (a time limit) or SIGALRM (--budget-s) arrived: unwind so the server's stacks are dumped, the
    server is stopped and the JSON says where it was."""


def _stop_on_signal(signum, frame) -> None:
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


def serve_and_measure(args, model: str, work: Workload, offline: dict, record, phase: Phases) -> None:
    """The offline rows, then the server's, each server row compared with the offline one at its concurrency."""
    for c in args.concurrency:
        offline[c] = run_offline(model, work, args, c, phase)
        r = offline[c][0]
        record(r)
        print(f"offline generate, max_num_seqs={c}: {r.tokens_per_s:,.0f} tok/s ({r.output_tokens} tokens, {r.seconds:.2f} s)",
              flush=True)
    port = free_port()
    log = args.out / "server_throughput_server.log"
    with phase("server start (until /health answers)"):
        server = start_server(model, port, args, log)
    pool = None
    try:
        url = f"http://127.0.0.1:{port}/v1"
        pool = concurrent.futures.ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
        warm = Workload(work.prompts[:args.client_procs * 2], [8] * args.client_procs * 2)
        with phase(f"client warm-up ({args.client_procs} processes start, import, connect; 8-token requests)"):
            run_load(pool, args.client_procs, url, warm, args.client_procs * 2, False, args.row_timeout)
        for stream in (False, True):
            for c in args.concurrency:
                with phase(f"serve c={c} stream={stream}"):
                    seconds, lat, outs = run_load(pool, args.client_procs, url, work, c, stream, args.row_timeout)
                tokens = sum(len(o) for o in outs)
                lat.sort()
                reference, reference_ids = offline[c]
                r = RunResult("parity serve", c, stream, seconds, tokens, tokens / seconds,
                              (tokens / seconds) / reference.tokens_per_s, statistics.median(lat),
                              lat[int(0.9 * (len(lat) - 1))], sum(o == w for o, w in zip(outs, reference_ids)), len(outs))
                record(r)
                print(f"serve c={c:4d} stream={stream!s:5}: {r.tokens_per_s:,.0f} tok/s = {r.ratio_to_offline:.3f}x offline, "
                      f"p50 {r.latency_p50_s:.2f} s, equal to offline {r.equal_to_offline}/{r.num_requests}", flush=True)
    except BaseException as e:
        print(f"{type(e).__name__} in phase {phase.current!r}: {e}", flush=True)
        dump_stacks(server)
        raise
    finally:
        server.terminate()
        server.wait(60)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    main()
