#!/usr/bin/env bash
# vLLM 0.20.0 onto the GPU machine in four transfers of at most 54 MiB, so that the peer benchmarks
# (benchmarks/peer_vllm.py, benchmarks/moe_device.py --vllm-path) can run beside parity in the same call.
# ../shared/peers/vllm/prepare.sh --moe writes .vl/a (60 MB), .vl/b (58 MB of package + 14 MiB of deps) and .vl/c;
# .vl/b with the working tree passes the 64 MiB a call may carry, so this re-splits them (git-ignored, /.vl2/):
#   .vl2/1: first 42 MB of the xz stream   .vl2/2: next 42 MB + the small deps   .vl2/3: xgrammar + the last bytes
#   .vl2/4: the third 42 MB slice (travels with the call that installs and runs)
# Here, once:  bash ../shared/peers/vllm/prepare.sh --moe && bash tools/vllm_device.sh split
# There, four `run` calls issued right after one another (the machine keeps /tmp only ~30 s after a call):
#   carry [".vl2/1"]             bash tools/vllm_device.sh stage .vl2/1
#   carry [".vl2/2"]             bash tools/vllm_device.sh stage .vl2/2
#   carry [".vl2/3"]             bash tools/vllm_device.sh stage .vl2/3
#   carry [".vl2/4", ...]        bash tools/vllm_device.sh install && python3 -m benchmarks.peer_vllm --out $OUT --vllm-path /tmp/vsite
# Used so on 2026-12-01 (benchmarks/RESULTS.md, "parity beside vLLM 0.20.0 in one call"): install ~40 s.
set -euo pipefail
case ${1:?usage: vllm_device.sh split | stage DIR | install} in
split)
  grep -qx '/.vl2/' .git/info/exclude || echo '/.vl2/' >> .git/info/exclude
  rm -rf .vl2 && mkdir -p .vl2/1 .vl2/2 .vl2/3 .vl2/4
  cat .vl/a/part00 .vl/b/part01 $(ls .vl/c/part02 2>/dev/null) | split -b 42000000 -d - .vl2/vs
  mv .vl2/vs00 .vl2/1/; mv .vl2/vs01 .vl2/2/; cp -r .vl/b/deps .vl2/2/; mv .vl2/vs02 .vl2/4/
  cp .vl/x/xgrammar-*.whl .vl2/3/; mv .vl2/vs0[3-9] .vl2/3/ 2>/dev/null || true
  du -sh .vl2/*
  ;;
stage)
  mkdir -p /tmp/vl && cp -r "$2"/* /tmp/vl/ && ls /tmp/vl
  ;;
install)
  ls /tmp/vl/vs00 /tmp/vl/vs01 /tmp/vl/xgrammar-*.whl > /dev/null || { echo "staged parts missing: the machine went cold"; exit 3; }
  rm -rf /tmp/vsite && mkdir -p /tmp/vsite
  cat /tmp/vl/vs00 /tmp/vl/vs01 .vl2/4/vs02 $(ls /tmp/vl/vs0[3-9] 2>/dev/null) | xz -d -T0 | tar x -C /tmp/vsite
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vsite /tmp/vl/deps/*.whl /tmp/vl/xgrammar-*.whl
  PYTHONPATH=/tmp/vsite python3 -c "import vllm; print('vllm', vllm.__version__, 'in /tmp/vsite')"
  ;;
*)
  echo "unknown stage $1 (split | stage DIR | install)" >&2; exit 2
  ;;
esac
