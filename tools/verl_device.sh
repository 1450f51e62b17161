#!/usr/bin/env bash
# verl 0.9.1 GRPO on SmolLM2-135M-Instruct with rollout.name=parity, on the GPU machine (one H200), in three
# back-to-back `run` calls of one warm machine (/tmp survives between calls only while it stays warm, ~30 s
# idle). A call carries 64 MiB in all, the working tree's ~5 MiB included: the GGUF is two halves of 47 MiB,
# verl's missing packages one 27 MiB xz archive (tools/verl_wheels.py: 35 CPython 3.12 wheels, ray core
# without its Java jar, TransferQueue, parity's server deps), so each travels alone.
#
# Here, once (all git-ignored):
#   python -m benchmarks.smollm2_device prepare              # .gguf/part1, .gguf/part2 (+ sha256)
#   python tools/verl_wheels.py build                        # .whl/verl1/site.tar.xz.part0 + sha256, wheels.txt
#   python tools/verl_wheels.py check                        # verl's PPO path imports with only the GPU image's
#                                                            # packages and the archive's (Python 3.11 builds)
#
#   call 1  carry [".whl/verl1"]    bash tools/verl_device.sh site                     (timeout_s 180)
#   call 2  carry [".gguf/part1"]   bash tools/verl_device.sh part1                    (timeout_s 120)
#   call 3  carry [".gguf/part2"]   bash tools/verl_device.sh run                      (timeout_s 600)
# (the site first: if it does not install, no GGUF has travelled). Expected device time: the machine's start
# (~1-2 min), site ~30 s, part1 ~10 s, run ~3 min (Ray and verl's workers ~1 min, model export ~15 s, parity's
# engine and CUDA graphs, 5 steps) -- about 5 min; the vLLM calls below add about 7 min.
#
# `site` unpacks the archive into /tmp/verl_site, installs parity there (its `verl.plugins` entry point) and
# checks that `import verl` registers ("parity", "async"). `run` joins the GGUF (sha256 checked), exports it
# once as an HF directory and runs examples/verl_grpo_arith.py (5 GRPO steps, 32 prompts x 4 samples, 64
# tokens, colocated) within RUN_S seconds (default 420; on the H200, 12-01: ~130 s from the start to the first
# step, 38 s for it, 13-15 s for each later one, then verl's teardown: STEPS=3 needs RUN_S >= ~240). Into $OUT:
#   verl_parity.json    reward and verl's timing_s/* per step, their means after the first step, the overrides;
#                       rewritten after every step (a run cut by RUN_S keeps its steps, exit_code 143), at the
#                       end verl's exit code and seconds_after_last_step (how long verl took to exit)
#   verl_parity.jsonl   every metric verl logged per step (its file logger)
#   verl_parity.log     the trainer's console, gpu.txt (GPU, driver, torch/triton/transformers/verl/ray)
#
# verl's vLLM rollout beside it (optional, four more calls right after call 3): vLLM 0.20.0, the release that
# pins the machine's torch (verl 0.9.1 pins 0.24.0; tools/verl_vllm_check.py runs verl's vLLM path against
# 0.20.0 on CPU: no patch needed), carried as tools/vllm_device.sh carries it (.vl/b with the tree would pass
# 64 MiB), plus .vlx: the four wheels vLLM's OpenAI server imports that prepare.sh's deps (chosen for the
# offline LLM) lack. Here, once:
#   bash ../shared/peers/vllm/prepare.sh --moe && bash tools/vllm_device.sh split   # .vl2/1..4
#   python tools/verl_vllm_check.py wheels && python tools/verl_vllm_check.py check  # .vlx/*.whl, the CPU check
#   call 4  carry [".vl2/1"]          bash tools/vllm_device.sh stage .vl2/1           (timeout_s 120)
#   call 5  carry [".vl2/2"]          bash tools/vllm_device.sh stage .vl2/2           (timeout_s 120)
#   call 6  carry [".vl2/3"]          bash tools/vllm_device.sh stage .vl2/3           (timeout_s 120)
#   call 7  carry [".vl2/4", ".vlx"]  bash tools/vllm_device.sh install && bash tools/verl_device.sh run-vllm
#                                                                                      (timeout_s 600)
# Calls 4-7 add about 9 min: the stages ~5 s each, install ~15-40 s, run-vllm ~7-8 min. Measured 12-01 on the H200:
# from the call's start to verl's `fit` 265 s when an earlier call had imported vLLM from /tmp/vsite, and over 360 s
# (vLLM's server still starting when RUN_S=320 ended it) on a fresh /tmp/vsite: ~135 s before Ray starts (the GGUF's
# HF export if `run` has not done it, the .vlx install, the vLLM import probe), ~80 s to verl's workers, 130 s or more
# for vLLM's server (torch.compile, verl turns its compile cache off, and CUDA graphs); then the steps and teardown.
# So give run-vllm its own call with RUN_S=480 or more, and `run` its own with RUN_S=300 (STEPS=3).
# VERL_OVERRIDES="key=value ..." adds Hydra overrides of verl's config to both runs (e.g. trainer.total_training_steps=3).
# `run-vllm` is `run` with rollout.name=vllm (same overrides; the model exported by call 3): verl_vllm.json,
# verl_vllm.jsonl, verl_vllm.log.
set -uo pipefail
stage=${1:?usage: verl_device.sh part1|site|run|run-vllm}
t=${SCRATCH:-/tmp}
site=$t/verl_site
out=${OUT:-$t/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0
export RAY_TMPDIR=$t/ray_verl  # this run's Ray session: its processes are found by that path, no one else's

recipe() {  # $1: rollout name; $2: extra PYTHONPATH entries before the site
  local name=$1
  export PYTHONPATH=${2:+$2:}$PWD:$site  # the working tree's parity; its entry point from the site
  python3 -c "import verl; from verl.workers.rollout.base import _ROLLOUT_REGISTRY as r; assert ('parity', 'async') in r" \
    || { echo "verl did not register rollout.name=parity (site missing: the machine went cold?)"; exit 3; }
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, transformers, verl, ray; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'verl', verl.__version__, 'ray', ray.__version__)"
    git log -1 --format=%H 2>/dev/null; } >> "$out/gpu.txt" 2>&1
  timeout --kill-after=60 "${RUN_S:-420}" python3 examples/verl_grpo_arith.py --out "$t/verl_$name" --rollout "$name" --steps "${STEPS:-5}" \
    --metrics "$out/verl_$name.json" -- ${VERL_OVERRIDES:-} 2>&1 | grep --line-buffered -v "Loading weights\|Writing model" > "$out/verl_$name.log"
  local code=${PIPESTATUS[0]}
  cp "$t/verl_$name/verl_$name.jsonl" "$out/" 2>/dev/null
  local left; left=$(pgrep -f "$RAY_TMPDIR/") && { echo "Ray processes left: $left"; kill $left; }
  tail -n 40 "$out/verl_$name.log"
  echo "exit $code"; ls -l "$out"
  return "$code"
}

case $stage in
part1)
  mkdir -p $t/sm && cp .gguf/part1/model.gguf.part1 $t/sm/ && ls -l $t/sm
  ;;
site)
  sum=$(cat .whl/verl1/site.tar.xz.part* | sha256sum | cut -d' ' -f1)
  [ "$sum" = "$(cat .whl/verl1/site.tar.xz.sha256)" ] || { echo "archive sha256 mismatch"; exit 2; }
  rm -rf "$site" && mkdir -p "$site" && cat .whl/verl1/site.tar.xz.part* | xz -d -T0 | tar x -C "$site" || exit 4
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --no-compile --target "$site" . || exit 5
  PYTHONPATH=$site python3 -c "import verl, ray, tensordict, transfer_queue, fastapi
from verl.workers.rollout.base import _ROLLOUT_REGISTRY as r; print('verl', verl.__version__, 'ray', ray.__version__,
'tensordict', tensordict.__version__, 'parity registered:', ('parity', 'async') in r)"
  ;;
run)
  python3 -m benchmarks.smollm2_device join --first $t/sm --second .gguf/part2 --site "$site" || exit 1
  recipe parity
  ;;
run-vllm)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite .vlx/*.whl \
    || { echo "vLLM's server wheels missing: carry .vlx (python tools/verl_vllm_check.py wheels)"; exit 6; }
  recipe vllm /tmp/vsite
  ;;
*)
  echo "unknown stage $stage (part1 | site | run | run-vllm)" >&2; exit 2
  ;;
esac
