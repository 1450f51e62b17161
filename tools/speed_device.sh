#!/usr/bin/env bash
# The faster-than-vLLM work's device calls with parity alone; each stage fits one `run` call (< 10 min) and
# everything it writes lands under $OUT/STAGE.
#   check:   the GPU suite, then deterministic attention's launch sweep with key segments of 256 and without
#   kernels: decode-step kernel tables: fast, deterministic with KEY_SEGMENT 256
#            patched in, and the Qwen3-8B shapes at batch 1 and 256
#   measure: the kernel, Triton-determinism and engine GPU tests, then step_speed in both modes (workloads A and B,
#            batch 1, kernel tables at batch 1 and 256)
#   gemv:    the GEMV's, the few-row choice's and the chunked log-softmax's GPU tests, the GEMV's launch sweep at 1, 2 and 4 rows (0.6B, 8B shapes),
#            what programmatic dependent launch saves between small kernels (benchmarks.pdl_chain), then fast mode's
#            workloads and batch-1 kernels with the choice in the engine
#   pdl:     the kernel, GEMV, Triton-determinism and engine GPU tests with programmatic dependent launch on,
#            the GEMV's launch sweep reading weights from HBM (fast.cold_copies), then step_speed in fast mode with
#            PDL on and off (PARITY_PDL=0) and in deterministic mode with it on
#   fused:   the GEMV GPU tests (plain, fused RMSNorm prologue, fused SiLU-and-mul epilogue, dependent-launch
#            chains), `gemv_sweep --fused` (fused kernel against the unfused pair, weights from HBM, PDL on/off),
#            the whole GPU suite (is it back to ~210 s with cold_copies capped?), and fast mode's step_speed with
#            the steps that prefill 64 fresh workload-A prompts traced
#   graphs:  the engine, Triton-determinism, GEMV and kernel GPU tests (prefill CUDA graphs, fused norm + projection),
#            then fast mode's step_speed with the prefill phase and TTFT traced
#   chunk:   fast mode's step_speed at prefill chunks of 8192 and 16384 tokens (vLLM 0.20 takes 16384 on an H200)
#   segments: deterministic attention's key segments in one loop (GPU determinism and few-row-choice tests, the
#            attention sweep with 8- and 32-token tiles: same bits?), then step_speed in both modes with the
#            few-row choices and the batch-1 and batch-256 kernel tables
#   sweeps:  deterministic attention with 16-token tiles (32 rows, still below the 64-row MMAs that made 32-token
#            tiles give other bits on 2026-12-02) and 2-4 warps: the 8-token tile's bits with half the K/V reloads?;
#            deterministic qkv and gate_up tiles at 256 and 512 rows with 64- and 128-deep K steps (1.28 against
#            ~0.92 ms of matmuls in a batch-256 step); key segments of 128 and 64
#   norm:    the whole GPU suite, then deterministic step_speed with the batch-1 and batch-256 kernel tables (run on
#            2026-12-03 against the deterministic norm fused into the decode matmul, since backed out: RESULTS.md)
#   fixed:   the same with the Triton-determinism, GEMV, kernel and causal-LM GPU tests in place of the whole suite
#            (the fused norm's second try, with a fixed-order sum of squares, also backed out)
#   profile: each kernel's own time (PARITY_PDL=0: no overlap between launches) in the batch-1 and batch-256 decode
#            steps of both modes at the 0.6B shapes and in fast mode at the 8B shapes, no workload rounds
#   prefetch: (its traced step misled on 2026-12-03: batch1 is the A/B to trust) the kernel, GEMV and
#            Triton-determinism GPU tests, then the batch-1 decode step (traced, dependent
#            launches on) with the L2 prefetches before each kernel's wait and without (PARITY_PREFETCH=0): both
#            modes at the 0.6B shapes, fast mode at the 8B shapes (PREFETCH_RUNS="fast ...": those runs only, no tests)
#   batch1:  the peer benchmark's batch-1 measure (benchmarks.batch1_ab, a process per run, two rounds) across an
#            env switch, BATCH1_ENV (default PARITY_PREFETCH=1,0), in both modes at the 0.6B shapes
set -uo pipefail
stage=${1:?usage: speed_device.sh check | kernels | measure | gemv | pdl | fused | graphs | chunk | segments | sweeps | norm | fixed | profile | prefetch | batch1}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
res=$OUT/$stage
mkdir -p "$res"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$res/gpu.txt"
step_speed_with_segment() {  # KEY_SEGMENT is a module constant: set it before the engine builds its kernels
  timeout 100 python3 - "$@" <<'PY'
import runpy, sys
import parity.kernels.triton.invariant as inv
inv.KEY_SEGMENT = int(sys.argv[1])
sys.argv = ["step_speed", *sys.argv[2:]]
runpy.run_module("benchmarks.step_speed", run_name="__main__")
PY
}
case $stage in
check)
  timeout 230 python3 -m pytest -m gpu -q -p no:cacheprovider tests > "$res/pytest_gpu.log" 2>&1
  tail -5 "$res/pytest_gpu.log"
  timeout 120 python3 -m benchmarks.invariant_attention_sweep --out "$res/sweep256" --segment 256 > "$res/sweep256.log" 2>&1
  tail -25 "$res/sweep256.log"
  timeout 100 python3 -m benchmarks.invariant_attention_sweep --out "$res/sweep0" --segment 0 > "$res/sweep0.log" 2>&1
  tail -25 "$res/sweep0.log"
  ;;
kernels)
  timeout 100 python3 -m benchmarks.step_speed --out "$res/fast" --rounds 0 > "$res/fast.log" 2>&1; tail -30 "$res/fast.log"
  step_speed_with_segment 256 --out "$res/det256" --rounds 0 --deterministic > "$res/det256.log" 2>&1; tail -30 "$res/det256.log"
  timeout 200 python3 -m benchmarks.step_speed --out "$res/8b" --spec qwen3-8b --rounds 0 --kernel-batches 1 256 > "$res/8b.log" 2>&1; tail -60 "$res/8b.log"
  ;;
measure)
  timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_determinism_triton.py \
    tests/test_gpu_engine.py > "$res/pytest_gpu.log" 2>&1; tail -4 "$res/pytest_gpu.log"
  for mode in fast deterministic; do
    flag=$([ $mode = deterministic ] && echo --deterministic)
    timeout 170 python3 -m benchmarks.step_speed --out "$res/$mode" --rounds 1 --kernel-batches 1 256 $flag \
      > "$res/$mode.log" 2>&1; grep -v "^ " "$res/$mode.log" | tail -14
  done
  ;;
gemv)
  timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gemv.py tests/test_kernels.py \
    tests/test_determinism_triton.py -k "gemv or fast_linear or log_softmax" > "$res/pytest_gpu.log" 2>&1
  tail -4 "$res/pytest_gpu.log"
  for spec in qwen3-0.6b qwen3-8b; do
    timeout 120 python3 -m benchmarks.gemv_sweep --out "$res/$spec" --spec $spec --rows 1 2 4 --block-n 4 8 16 \
      --block-k 256 512 --warps 2 4 --stages 3 > "$res/$spec.log" 2>&1; grep "==" "$res/$spec.log"
  done
  timeout 60 python3 -m benchmarks.pdl_chain --out "$res/pdl" > "$res/pdl.log" 2>&1; cat "$res/pdl.log"
  timeout 170 python3 -m benchmarks.step_speed --out "$res/fast" --rounds 1 --kernel-batches 1 > "$res/fast.log" 2>&1
  grep -v "^ " "$res/fast.log" | tail -6; grep -A16 "batch-1 step" "$res/fast.log"
  ;;
pdl)
  timeout 230 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_gemv.py \
    tests/test_determinism_triton.py tests/test_gpu_engine.py > "$res/pytest_gpu.log" 2>&1; tail -4 "$res/pytest_gpu.log"
  timeout 90 python3 -m benchmarks.gemv_sweep --out "$res/gemv" --rows 1 2 4 --block-n 4 8 16 \
    --block-k 512 1024 2048 --warps 4 --stages 1 3 > "$res/gemv.log" 2>&1; grep "==" "$res/gemv.log"
  for run in fast nopdl det; do
    flag=$([ $run = det ] && echo --deterministic); pdl=$([ $run = nopdl ] && echo 0 || echo 1)
    PARITY_PDL=$pdl timeout 120 python3 -m benchmarks.step_speed --out "$res/$run" --rounds 1 $flag \
      > "$res/$run.log" 2>&1; echo "== $run"; grep -v "^ " "$res/$run.log" | tail -5
  done
  ;;
fused)
  timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gemv.py > "$res/pytest_gemv.log" 2>&1
  tail -4 "$res/pytest_gemv.log"
  timeout 90 python3 -m benchmarks.gemv_sweep --out "$res/fused" --fused > "$res/fused.log" 2>&1; cat "$res/fused.log"
  start=$(date +%s)
  timeout 260 python3 -m pytest -m gpu -q -p no:cacheprovider tests > "$res/pytest_gpu.log" 2>&1
  echo "GPU suite: $(( $(date +%s) - start )) s"; tail -4 "$res/pytest_gpu.log"
  timeout 140 python3 -m benchmarks.step_speed --out "$res/fast" --rounds 1 --prefill-phase 64 > "$res/fast.log" 2>&1
  grep -v "^ " "$res/fast.log" | tail -6; grep -A12 "batch-1 step" "$res/fast.log"; grep -A25 "prefill phase" "$res/fast.log"
  ;;
graphs)
  timeout 320 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_engine.py tests/test_determinism_triton.py \
    tests/test_gemv.py tests/test_kernels.py -k "not sweep" > "$res/pytest_gpu.log" 2>&1; tail -15 "$res/pytest_gpu.log"
  timeout 150 python3 -m benchmarks.step_speed --out "$res/fast" --rounds 1 --prefill-phase 64 --ttft > "$res/fast.log" 2>&1
  grep -v "^ " "$res/fast.log" | tail -8; grep -A12 "batch-1 step" "$res/fast.log"; grep -A14 "prefill phase" "$res/fast.log"
  grep -A6 "^TTFT" "$res/fast.log"
  ;;
chunk)
  for n in 8192 16384; do
    timeout 130 python3 -m benchmarks.step_speed --out "$res/fast$n" --rounds 1 --max-num-batched-tokens $n \
      --prefill-phase 64 > "$res/fast$n.log" 2>&1; echo "== max_num_batched_tokens $n"; grep -v "^ " "$res/fast$n.log" | tail -6
    grep -A1 "prefill phase" "$res/fast$n.log"
  done
  ;;
segments)
  timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_determinism_triton.py tests/test_kernels.py \
    > "$res/pytest_gpu.log" 2>&1; tail -6 "$res/pytest_gpu.log"
  timeout 130 python3 -m benchmarks.invariant_attention_sweep --out "$res/tiles" --warps 4 --stages 2 3 \
    --maxnreg 0 128 --tokens 8 32 > "$res/tiles.log" 2>&1; tail -12 "$res/tiles.log"
  for mode in fast deterministic; do
    flag=$([ $mode = deterministic ] && echo --deterministic)
    timeout 130 python3 -m benchmarks.step_speed --out "$res/$mode" --rounds 1 --kernel-batches 1 256 $flag \
      > "$res/$mode.log" 2>&1; echo "== $mode"; grep -v "^ " "$res/$mode.log" | tail -30; grep -A14 "batch-256 step" "$res/$mode.log"
  done
  ;;
sweeps)
  timeout 200 python3 -m benchmarks.invariant_attention_sweep --out "$res/tiles" --tokens 8 16 --warps 2 4 \
    --stages 2 3 > "$res/tiles.log" 2>&1; tail -20 "$res/tiles.log"
  for seg in 128 64; do  # shorter key segments: more split programs at batch 1, at what cost at 256?
    timeout 100 python3 -m benchmarks.invariant_attention_sweep --out "$res/seg$seg" --segment $seg --warps 4 \
      --stages 2 3 > "$res/seg$seg.log" 2>&1; tail -3 "$res/seg$seg.log"
  done
  timeout 200 python3 -m benchmarks.invariant_linear_sweep --out "$res/lin256" --rows 256 512 --block-m 64 128 \
    --block-n 64 128 --block-k 64 128 --stages 3 4 --warps 4 8 --shapes qkv gate_up > "$res/lin256.log" 2>&1
  grep -A8 "==" "$res/lin256.log"
  ;;
norm)
  start=$(date +%s)
  timeout 340 python3 -m pytest -m gpu -q -p no:cacheprovider tests > "$res/pytest_gpu.log" 2>&1
  echo "GPU suite: $(( $(date +%s) - start )) s"; grep -E "^(FAILED|ERROR)" "$res/pytest_gpu.log" | head -20; tail -3 "$res/pytest_gpu.log"
  timeout 170 python3 -m benchmarks.step_speed --out "$res/deterministic" --rounds 1 --kernel-batches 1 256 \
    --deterministic > "$res/deterministic.log" 2>&1; grep -v "^ " "$res/deterministic.log" | tail -14
  grep -A22 "batch-1 step" "$res/deterministic.log"
  ;;
fixed)
  timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_determinism_triton.py tests/test_gemv.py \
    tests/test_kernels.py tests/test_causal_lm.py --tb=line -rf > "$res/pytest_gpu.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$res/pytest_gpu.log" | head -20; tail -1 "$res/pytest_gpu.log"
  timeout 150 python3 -m benchmarks.step_speed --out "$res/deterministic" --rounds 1 --kernel-batches 1 256 \
    --deterministic > "$res/deterministic.log" 2>&1; grep -v "^ " "$res/deterministic.log" | tail -8
  grep -A8 "batch-1 step" "$res/deterministic.log"
  ;;
profile)
  for run in fast deterministic 8b; do
    flags=$(case $run in deterministic) echo --deterministic ;; 8b) echo --spec qwen3-8b ;; esac)
    PARITY_PDL=0 timeout $([ $run = 8b ] && echo 200 || echo 150) python3 -m benchmarks.step_speed --out "$res/$run" --rounds 0 --kernel-batches 1 256 \
      $flags > "$res/$run.log" 2>&1; echo "== $run"; grep -A14 "step:" "$res/$run.log"
  done
  ;;
prefetch)
  [ -n "${PREFETCH_RUNS:-}" ] || { timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_determinism_triton.py tests/test_gemv.py > "$res/pytest_gpu.log" 2>&1; tail -4 "$res/pytest_gpu.log"; }
  for run in ${PREFETCH_RUNS:-fast deterministic 8b}; do
    flags=$(case $run in deterministic) echo --deterministic ;; 8b) echo --spec qwen3-8b ;; esac)
    for pf in 1 0; do
      PARITY_PREFETCH=$pf timeout 120 python3 -m benchmarks.step_speed --out "$res/$run-prefetch$pf" --rounds 0 \
        $flags > "$res/$run-prefetch$pf.log" 2>&1; echo "== $run PARITY_PREFETCH=$pf"; grep -A6 "step:" "$res/$run-prefetch$pf.log"
    done
  done
  ;;
batch1)
  for mode in fast deterministic; do
    flag=$([ $mode = deterministic ] && echo --deterministic)
    timeout 240 python3 -m benchmarks.batch1_ab --out "$res/$mode" $flag --env "${BATCH1_ENV:-PARITY_PREFETCH=1,0}" \
      --rounds 2 > "$res/$mode.log" 2>&1; echo "== $mode"; tail -4 "$res/$mode.log"
  done
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
