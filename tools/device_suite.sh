#!/usr/bin/env bash
# The lead's device runs, two calls back to back on one warm machine (see docs/real_model.md for why the
# GGUF travels in halves). Everything lands in /tmp/res and comes back as one archive, $OUT/res-STAGE.tgz.
#   stage1 (carry .gguf/part1): GPU tests, mismatch benchmark, GRPO benchmark, diagnose on a Qwen3-shaped model
#   stage2 (carry .gguf/part2 .whl/gguf-0.19.0-py3-none-any.whl; not all of .whl, whose wandb/ would pass the
#          64 MiB carry): SmolLM2 from GGUF: mismatch vs the HF anchor, diagnose, GRPO bf16/fp16 without W&B
#          (tools/smollm2_grpo_device.sh runs the GRPO sweep with W&B)
set -uo pipefail
stage=$1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
res=/tmp/res/$stage
mkdir -p "$res" /tmp/sm
pack() { tar czf "$OUT/res-$stage.tgz" --exclude="*.safetensors" --exclude="*.jsonl" -C "$res" . ; }
trap pack EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$res/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$res/gpu.txt"
case $stage in
stage1)
  cp .gguf/part1/model.gguf.part1 /tmp/sm/
  timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -40 > "$res/pytest_gpu.log"
  timeout 200 python3 -m benchmarks.mismatch --out "$res/mismatch" --num-prompts 64 --max-tokens 256 \
    --throughput-prompts 128 > "$res/mismatch.log" 2>&1
  timeout 150 python3 -m benchmarks.grpo_device --out "$res/grpo" > "$res/grpo.log" 2>&1
  python3 - <<'PY' > "$res/diag_model.log" 2>&1
from dataclasses import replace
from benchmarks.throughput import QWEN3_06B
from parity.testing.factory import write_tiny_model
write_tiny_model("/tmp/qwen3shape", replace(QWEN3_06B, initializer_range=0.05))
PY
  timeout 120 python3 -m parity.cli.main diagnose run --model /tmp/qwen3shape --dtypes fp16,bf16 --device cuda \
    --n 8 --max-tokens 128 --out "$res/diag_qwen3shape" > "$res/diag_qwen3shape.log" 2>&1
  ;;
stage2)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  python3 -m benchmarks.smollm2_device join --first /tmp/sm --second .gguf/part2 --site /tmp/site > "$res/join.log" 2>&1 || exit 1
  timeout 150 python3 -m benchmarks.smollm2_device mismatch --device cuda --out "$res/smollm2_mismatch.json" \
    > "$res/smollm2_mismatch.log" 2>&1
  timeout 120 python3 -m parity.cli.main diagnose run --model smollm2-135m-instruct --chat --dtypes fp16,bf16 \
    --device cuda --n 8 --max-tokens 128 --out "$res/diag_smollm2" > "$res/diag_smollm2.log" 2>&1
  timeout 300 python3 -m benchmarks.smollm2_device grpo --budget-s 280 --set tracking.mode=disabled \
    --variant "bf16: engine.dtype=bf16 optim.mixed_precision=bf16" --variant "fp16: engine.dtype=fp16 optim.mixed_precision=fp16" \
    --runs-dir /tmp/grpo_runs --out "$res/smollm2_grpo.json" --plot "$res/smollm2_grpo.png" > "$res/smollm2_grpo.log" 2>&1
  ;;
esac
