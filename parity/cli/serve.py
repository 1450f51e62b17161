"""`parity serve MODEL`: the OpenAI-compatible HTTP server (completions, chat, streaming, token ids, RL control)."""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "PARITY_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (needs the 'serve' extra)",
        description="Serve MODEL over OpenAI's HTTP API: /v1/completions, /v1/chat/completions (streaming, n, seed, "
                    "logprobs, return_token_ids), /v1/models, /health, /tokenize, and RL control routes "
                    "(/update_weights, /sleep, /wake_up, /abort, /weight_version). Binds 127.0.0.1 unless --host says "
                    "otherwise.")
    p.add_argument("model", help="HF model directory, .gguf file or alias (smollm2-135m-instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every route (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--served-model-name", help="the model name clients send (default: MODEL as given)")
    p.add_argument("--dtype", default="auto", help="auto, fp16, bf16 or fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step (default 256)")
    p.add_argument("--kv-cache-memory", type=int, help="KV-cache bytes (default: from --memory-utilization)")
    p.add_argument("--memory-utilization", type=float, default=0.9, help="fraction of device memory (default 0.9)")
    p.add_argument("--deterministic", action="store_true", help="batch-invariant kernels (bitwise reproducible logprobs)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--seed", type=int, default=0, help="engine seed for requests without one (default 0)")
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine on a thread of the HTTP process, not in a process of its own (sharing its GIL)")
    p.add_argument("--engine-startup-timeout", type=float, default=1800.0,
                   help="seconds the engine process may take to load the model (default 1800); then it is killed")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--disable-access-log", action="store_true", help="no log line per HTTP request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parity.cli.main import UsageError

    try:
        from parity.server.engine_process import log_to_stderr
        from parity.server.launch import build_app, serve
    except ImportError as e:
        raise UsageError(f"parity serve needs the serve extra ({e.name} is missing): pip install 'parity[serve]'") from e
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if not args.engine_startup_timeout > 0:
        raise UsageError(f"--engine-startup-timeout must be > 0 seconds, got {args.engine_startup_timeout}")
    options = dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                   kv_cache_memory=args.kv_cache_memory, memory_utilization=args.memory_utilization,
                   deterministic=args.deterministic, enforce_eager=args.enforce_eager, seed=args.seed)
    if not args.engine_in_process:
        options["startup_timeout"] = args.engine_startup_timeout
    log_to_stderr(args.log_level, "parity-http")  # before build_app: the engine process takes its level from here
    app = build_app(args.model, args.served_model_name, args.api_key, engine_process=not args.engine_in_process,
                    **options)
    serve(app, args.host, args.port, args.log_level, access_log=not args.disable_access_log)
    return 0
