"""Does verl 0.9.1's vLLM rollout (rollout.name=vllm) run on vLLM 0.20.0, the only vLLM the GPU machine gets?

verl 0.9.1 pins vLLM 0.24; the peer folder's build (../shared/peers/vllm/prepare.sh --moe -> .vl/) is 0.20.0,
the release that pins the machine's torch 2.11. This checks, on CPU, everything of verl's vLLM path that runs
without a GPU, against that very package, in a fresh interpreter (-S) that sees only the GPU image's
distributions (KINDS.md, as installed here), verl's (installed here; tools/verl_wheels.py carries them),
vLLM's carried dependencies (the .vl wheels' pins, Python 3.11 builds) and SERVER_WHEELS:
- the imports of the trainer's ServerAdapter, of the vLLMHttpServer Ray actor (vLLM's CLI parser, its OpenAI
  api_server, AsyncLLM), of vLLM's engine-core and GPU-worker processes and of verl's worker extension;
- verl's own `launch_server` on the recipe's rollout config (examples/verl_grpo_arith.py, a tiny Llama) up to
  vLLM's CLI parse, then AsyncEngineArgs.from_cli_args: every flag verl passes exists in 0.20.0 and lands;
- the SamplingParams and TokensPrompt verl's generate builds, and build_app (the routes verl's server serves);
- every AsyncLLM member verl's server calls exists and takes the keywords verl passes; init_app_state's and
  AsyncLLM.from_vllm_config's signatures take the branch verl picks;
- the worker extension joins vLLM's Worker without a name clash (vLLM asserts that at start) and
  process_weights_after_loading takes verl's arguments.
vLLM's config classes need a platform: the child uses vLLM's CPU platform class (the GPU machine resolves
CUDA's), so nothing device-bound is built: the engine config itself, sleep mode (CuMem), the CUDA-IPC weight
sync, torch.compile and CUDA graphs are left to the GPU run.

SERVER_WHEELS are what the OpenAI server path imports that neither the image nor prepare.sh's deps (chosen
for the offline `LLM`) hold. `wheels` downloads them (CPython 3.12, the device's) into .vlx/ (git-ignored);
tools/verl_device.sh's `run-vllm` installs them into /tmp/vsite.

    python tools/verl_vllm_check.py wheels                          # .vlx/*.whl, once
    python tools/verl_vllm_check.py check                           # ~1 min after the first run (~2 min)
    python tools/verl_vllm_check.py check --without-server-wheels   # what fails without them
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]  # verl_wheels beside this file; parity for its tiny model
import verl_wheels  # noqa: E402  (the device's distribution list, the -S site builder, Python 3.12 targets)

SERVER_WHEELS = ["watchfiles==1.3.0", "model-hosting-container-standards==0.1.16", "jmespath==1.1.0",
                 "prometheus-fastapi-instrumentator==8.1.0"]
# on the GPU image (KINDS.md) and imported by vLLM's server path, but not installed here: filled in for the check
IMAGE_HAS = ["uvloop", "einops"]

CHILD = r'''
import asyncio, ast, importlib, inspect, json, sys, textwrap, types
from pathlib import Path
failed, seen = {}, {}

def attempt(name, fn, shown=lambda value: value):
    """fn's value (None if it raised); `shown` of it goes into the report."""
    try:
        value = fn()
    except BaseException as e:  # every check is reported, not the first failure
        failed[name] = f"{type(e).__name__}: {e}"[:600]
        return None
    seen[name] = shown(value)
    return value

import vllm.platforms
from vllm.platforms.cpu import CpuPlatform
vllm.platforms._current_platform = CpuPlatform()

MODULES = ["verl.workers.rollout.vllm_rollout", "verl.workers.rollout.vllm_rollout.vllm_async_server",
           "verl.workers.rollout.vllm_rollout.utils", "verl.utils.vllm", "verl.third_party.vllm",
           "vllm.entrypoints.openai.generate.api_router", "vllm.entrypoints.openai.chat_completion.serving",
           "vllm.entrypoints.openai.completion.serving", "vllm.entrypoints.openai.responses.serving",
           "vllm.entrypoints.anthropic.serving", "vllm.entrypoints.mcp.tool_server", "vllm.renderers",
           "vllm.v1.engine.core", "vllm.v1.executor.multiproc_executor", "vllm.v1.worker.gpu_worker",
           "vllm.v1.worker.gpu_model_runner", "vllm.model_executor.models.llama",
           "vllm.model_executor.model_loader.dummy_loader", "vllm.v1.attention.backends.flash_attn"]
for module in MODULES:
    attempt(f"import {module}", lambda: importlib.import_module(module) and "ok")
if failed:
    print(json.dumps({"failed": failed}, indent=1)); sys.exit(1)

import vllm
import verl_grpo_arith as recipe
from verl.third_party.vllm import VLLM_SLEEP_LEVEL
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig
from verl.workers.rollout.replica import RolloutMode
from verl.workers.rollout.vllm_rollout import vllm_async_server as server_module
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.openai.api_server import build_app, init_app_state
from vllm.inputs import TokensPrompt
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.output_processor import OutputProcessor
from vllm.v1.worker.gpu_worker import Worker

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
seen["vllm"] = vllm.__version__
seen["verl sleep level"] = VLLM_SLEEP_LEVEL  # 2 for vLLM >= 0.18 (weights discarded while the actor trains)
args = recipe.argparse.Namespace(out=out, rollout="vllm", steps=2, batch_size=8, group_size=4, max_tokens=32,
                                 gpu_memory_utilization=0.3)
train, val = recipe.write_data(out, num_train=8, num_val=4, max_operand=20, seed=0)
config, rollout = recipe.compose(recipe.overrides(args, model_dir, train, val))

def parse_as_verl():
    """verl's launch_server up to vLLM's CLI parse (run_server, which needs the GPU, replaced by a capture)."""
    server = object.__new__(server_module.vLLMHttpServer)
    server.config = rollout
    server.model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model, dataclass_type=HFModelConfig)
    server._validate_configs()
    server.__dict__.update(_disaggregation_role="null", _disaggregation_kv_transfer_config=None, workers=[None],
                           rollout_mode=RolloutMode.HYBRID, replica_rank=0, node_rank=0, gpus_per_node=1, nnodes=1,
                           _master_address="127.0.0.1", _master_port=1, _dp_rpc_port=2, _dp_master_port=3,
                           profiler_controller=types.SimpleNamespace(check_enable=lambda: False))
    captured = {}
    async def capture(parsed):
        captured["args"] = parsed
    server.run_server = capture
    asyncio.run(server.launch_server())
    return captured["args"]

parsed = attempt("verl's serve arguments parse", parse_as_verl, shown=lambda parsed: parsed.model)
if parsed is not None:
    def engine_args():
        engine = AsyncEngineArgs.from_cli_args(parsed)
        want = {"model": str(model_dir), "load_format": "dummy", "enable_sleep_mode": True, "seed": rollout.seed,
                "worker_extension_cls": "verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension",
                "max_model_len": rollout.max_model_len, "logprobs_mode": rollout.logprobs_mode,
                "gpu_memory_utilization": rollout.gpu_memory_utilization, "distributed_executor_backend": "mp",
                "enable_prefix_caching": rollout.enable_prefix_caching, "skip_tokenizer_init": False}
        got = {k: getattr(engine, k) for k in want}
        assert got == want, f"AsyncEngineArgs differ from verl's: {got} != {want}"
        return f"{len(want)} fields as verl set them; cudagraph_mode {engine.compilation_config.cudagraph_mode}"
    attempt("AsyncEngineArgs.from_cli_args", engine_args)
    attempt("build_app(supported_tasks=('generate',))",
            lambda: f"{len(build_app(parsed, supported_tasks=('generate',), model_config=None).routes)} routes")

def sampling():  # what vLLMHttpServer.generate builds from the agent loop's dict
    params = SamplingParams(max_tokens=32, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                            repetition_penalty=1.0, logprobs=0, ignore_eos=False)
    TokensPrompt(prompt_token_ids=[1, 2, 3], multi_modal_data={})
    return f"logprobs={params.logprobs} top_k={params.top_k}"
attempt("SamplingParams / TokensPrompt", sampling)

def async_llm_calls():
    """Every `self.engine.NAME(...)` / `engine_client.NAME` of verl's server exists on AsyncLLM (methods, or
    attributes its __init__ sets) and takes the keywords verl passes."""
    tree = ast.parse(inspect.getsource(server_module))
    init_attrs = {n.attr for n in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(AsyncLLM.__init__))))
                  if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
    calls, missing, bad_keywords = {}, [], []
    for node in ast.walk(tree):
        target = node.func if isinstance(node, ast.Call) else node
        if not isinstance(target, ast.Attribute):
            continue
        owner = ast.unparse(target.value)
        if owner in ("self.engine", "engine_client"):
            calls.setdefault(target.attr, set()).update(k.arg for k in getattr(node, "keywords", []) if k.arg)
    for name, keywords in sorted(calls.items()):
        if not hasattr(AsyncLLM, name) and name not in init_attrs:
            missing.append(name)
        elif keywords and callable(getattr(AsyncLLM, name, None)):
            params = inspect.signature(getattr(AsyncLLM, name)).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                bad_keywords += [f"{name}({k}=)" for k in keywords - set(params)]
    assert not missing and not bad_keywords, f"missing {missing}, unknown keywords {bad_keywords}"
    return sorted(calls)
attempt("AsyncLLM members verl calls", async_llm_calls)
attempt("AsyncLLM.from_vllm_config keywords", lambda: sorted(
    {"enable_log_requests", "disable_log_stats"} & set(inspect.signature(AsyncLLM.from_vllm_config).parameters)))
attempt("init_app_state branch", lambda: "supported_tasks" if "supported_tasks" in inspect.signature(
    init_app_state).parameters else "vllm_config" if "vllm_config" in inspect.signature(init_app_state).parameters
    else "neither")

def worker_extension():
    clashes = [a for a in dir(vLLMColocateWorkerExtension) if not a.startswith("__") and hasattr(Worker, a)]
    assert not clashes, f"vLLM refuses an extension whose names the Worker has: {clashes}"
    inspect.signature(process_weights_after_loading).bind("model", "model_config", "device")
    return "no clash; process_weights_after_loading(model, model_config, device)"
attempt("worker extension", worker_extension)

def per_request_abort():  # vLLMHttpServer.abort_request: output_processor.abort_requests([request_id])
    try:
        inspect.signature(OutputProcessor.abort_requests).bind("self", ["request"])
        return "binds"
    except TypeError as e:  # verl catches it and answers {"aborted": False}: a known gap, not on GRPO's path
        return f"does not bind on 0.20.0 ({e}); verl's abort_request answers aborted=False"
seen["per-request abort (partial rollouts only)"] = per_request_abort()
print(json.dumps({"seen": seen, "failed": failed}, indent=1, default=str))
sys.exit(1 if failed else 0)
'''


def vllm_parts(vl: Path) -> list[Path]:
    parts = sorted(vl.glob("*/part*"), key=lambda p: int(p.name.removeprefix("part")))
    if not parts:
        raise SystemExit(f"no vLLM parts under {vl}: run bash ../shared/peers/vllm/prepare.sh --moe")
    return parts


def unpack(vl: Path, site: Path) -> None:
    """The split xz tar of prepare.sh, joined and unpacked as gpu.sh does on the device (once)."""
    if (site / "vllm" / "__init__.py").exists():
        return
    site.mkdir(parents=True, exist_ok=True)
    cat = subprocess.Popen(["cat", *map(str, vllm_parts(vl))], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=cat.stdout, mode="r|xz") as tar:
        tar.extractall(site, filter="tar")
    if cat.wait() != 0:
        raise SystemExit("joining the vLLM parts failed")


def pins_of(wheels: list[Path]) -> list[str]:
    return [f"{w.name.split('-')[0]}=={w.name.split('-')[1]}" for w in wheels]


def fill_deps(vl: Path, deps: Path, server_wheels: list[Path]) -> None:
    """Python 3.11 builds of vLLM's carried dependencies (same pins), the image's packages vLLM's path needs
    that are not installed here, and the server wheels themselves (pure Python or abi3), into `deps`."""
    from importlib.metadata import distributions

    have = {(verl_wheels.normalize(d.metadata["Name"]), d.version) for d in distributions(path=[str(deps), *sys.path])}
    present = {name for name, _ in have}
    wanted = [p for p in pins_of(sorted(vl.glob("b/deps/*.whl")) + sorted(vl.glob("x/*.whl")))
              if (verl_wheels.normalize(p.split("==")[0]), p.split("==")[1]) not in have]
    wanted += [name for name in IMAGE_HAS if verl_wheels.normalize(name) not in present]
    local = [str(w) for w in server_wheels if verl_wheels.normalize(w.name.split("-")[0]) not in present]
    if wanted or local:
        verl_wheels.pip("install", "-q", "--no-deps", "--no-compile", "--target", str(deps), *wanted, *local)


def download(dest: Path) -> None:
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.exists() and "/.vlx/" not in exclude.read_text().split():
        with exclude.open("a") as f:
            f.write("/.vlx/\n")
    verl_wheels.pip("download", "-q", "--no-deps", *verl_wheels.TARGET, "-d", str(dest), *SERVER_WHEELS)
    print("\n".join(sorted(p.name for p in dest.glob("*.whl"))))


def check(vl: Path, wheels: Path, scratch: Path, with_server_wheels: bool) -> int:
    server_wheels = sorted(wheels.glob("*.whl")) if with_server_wheels else []
    if with_server_wheels and len(server_wheels) != len(SERVER_WHEELS):
        raise SystemExit(f"{wheels} holds {len(server_wheels)} wheels, want {len(SERVER_WHEELS)}: run `wheels` first")
    site, deps = scratch / "vllm_site", scratch / "deps311"
    unpack(vl, site)
    fill_deps(vl, deps, server_wheels)
    from parity.testing.factory import write_tiny_model

    model_dir = scratch / "tiny-llama"
    if not (model_dir / "config.json").exists():
        write_tiny_model(model_dir)
    carried = {verl_wheels.normalize(p.split("==")[0]) for p in pins_of(sorted(vl.glob("*/deps/*.whl")) + sorted(
        vl.glob("x/*.whl")))} | {"vllm"}
    verl_side = {verl_wheels.normalize(pin.split("==")[0]) for pin in verl_wheels.WHEELS + verl_wheels.SDISTS}
    allowed = verl_wheels.device_distributions() | carried | verl_side | {"parity"} | {
        verl_wheels.normalize(w.name.split("-")[0]) for w in server_wheels}
    search = [str(site), str(deps), *[p for p in sys.path if p.endswith("site-packages")]]
    with tempfile.TemporaryDirectory() as tmp:
        linked = Path(tmp) / "site"
        linked.mkdir()
        verl_wheels.device_like_site(allowed, linked, search)
        env = {"PYTHONPATH": os.pathsep.join([str(linked), str(ROOT), str(ROOT / "examples")]), "PATH": "/usr/bin:/bin",
               "HOME": tmp, "TRITON_INTERPRET": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
        out = Path(tmp) / "recipe"
        out.mkdir()
        return subprocess.run([sys.executable, "-S", "-c", CHILD, str(model_dir), str(out)], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["wheels", "check"])
    parser.add_argument("--vl", type=Path, default=ROOT / ".vl", help="prepare.sh's output (a/part00, b/deps, ...)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".vlx", help="where SERVER_WHEELS are downloaded")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/verl_vllm_check"),
                        help="check: the unpacked vLLM, Python 3.11 builds of its deps, a tiny model (kept)")
    parser.add_argument("--without-server-wheels", action="store_true", help="check: leave SERVER_WHEELS out")
    args = parser.parse_args(argv)
    if args.stage == "wheels":
        download(args.wheels)
        return 0
    return check(args.vl, args.wheels, args.scratch, not args.without_server_wheels)


if __name__ == "__main__":
    raise SystemExit(main())
