#!/usr/bin/env bash
# SmolLM2-135M-Instruct GRPO on the device, in three back-to-back calls of one warm machine (/tmp survives
# between calls only while the machine stays warm, ~30 s idle). What each call carries (64 MiB per call,
# the repo's ~3 MiB included): the GGUF is 94 MiB in two halves of 47 MiB, the wandb wheelhouse 26 MiB.
#
# Here, once (all git-ignored):
#   python -m benchmarks.smollm2_device prepare          # .gguf/part1, .gguf/part2 (+ sha256)
#   .whl/gguf-0.19.0-py3-none-any.whl and .whl/wandb/ (wandb 0.31.0 + deps, CPython 3.12 manylinux): docs/real_model.md
#
#   call 1  carry [".gguf/part1"]   bash tools/smollm2_grpo_device.sh part1
#   call 2  carry [".whl"]          bash tools/smollm2_grpo_device.sh wheels
#   call 3  carry [".gguf/part2"]   bash tools/smollm2_grpo_device.sh run        (timeout_s 600)
#
# `run` joins the GGUF (sha256 checked) and runs the GRPO sweep of configs/grpo_smollm2_arith.yaml within
# BUDGET_S seconds (default 500; a run's GRPO stops early to fit, later runs are skipped): bf16 (engine and
# trainer), fp16, then bf16 without the warm-start on the last_numbers reward instead. Into $OUT:
#   smollm2_grpo_sweep.json   every run: held-out accuracy ± SE (base / warm-start / every 25 steps / final),
#                             GRPO's paired gain, reward, mismatch and phase-time curves, config, device
#   smollm2_grpo_sweep.png    reward per step and held-out accuracy with 95% intervals, per run
#   smollm2_grpo_wandb.tgz    each run's offline W&B directory + metrics.jsonl (`wandb sync` after unpacking)
#   smollm2_grpo.log, gpu.txt
# The three files are rewritten after each run, so a cut-short call still returns the finished runs.
set -uo pipefail
stage=${1:?usage: smollm2_grpo_device.sh part1|wheels|run}
t=${SCRATCH:-/tmp}  # survives between calls while the machine is warm
case $stage in
part1)
  mkdir -p $t/sm && cp .gguf/part1/model.gguf.part1 $t/sm/ && ls -l $t/sm
  ;;
wheels)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $t/site .whl/gguf-*.whl \
    && python3 -m pip install -q --no-index --find-links .whl/wandb --no-cache-dir --target $t/wsite wandb \
    && PYTHONPATH=$t/site:$t/wsite python3 -c "import gguf, wandb; print('gguf', gguf.__file__, 'wandb', wandb.__version__)"
  ;;
run)
  export PYTHONPATH=$t/site:$t/wsite:$PWD PYTHONUNBUFFERED=1 WANDB_SILENT=true WANDB_MODE=offline
  out=${OUT:-/tmp/out}
  mkdir -p "$out"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
    git log -1 --format=%H 2>/dev/null; } > "$out/gpu.txt" 2>&1
  python3 -m benchmarks.smollm2_device join --first $t/sm --second .gguf/part2 --site $t/site || exit 1
  python3 -m benchmarks.smollm2_device grpo --budget-s "${BUDGET_S:-500}" \
    --variant "bf16: engine.dtype=bf16 optim.mixed_precision=bf16" \
    --variant "fp16: engine.dtype=fp16 optim.mixed_precision=fp16" \
    --variant "bf16-rl-only: engine.dtype=bf16 optim.mixed_precision=bf16 warmstart.steps=0 task.reward=last_numbers rollout.max_tokens=24" \
    --runs-dir $t/grpo_runs --out "$out/smollm2_grpo_sweep.json" --plot "$out/smollm2_grpo_sweep.png" \
    --pack "$out/smollm2_grpo_wandb.tgz" 2>&1 | grep --line-buffered -v "Loading weights\|Writing model" | tee "$out/smollm2_grpo.log"
  ;;
*)
  echo "unknown stage $stage (part1 | wheels | run)" >&2; exit 2
  ;;
esac
