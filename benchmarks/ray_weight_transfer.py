"""One Ray call carrying a model's weights to an actor, as torch tensors against parity's wire format.

parity's verl adapter sends the trainer's weights to its rollout server in one Ray call. Ray pickles a torch
tensor in band (its bytes copied through the pickle stream) and a numpy array out of band (one copy into the
object store, read back as a view), so `parity.integrations.verl.to_wire` sends each tensor's bytes as a numpy
array and `from_wire` rebuilds it. This times both on the host alone (no GPU): SmolLM2-135M's tensor shapes by
default (271 tensors, 134.5M parameters), bf16, a local Ray instance, the actor touching every tensor it gets.

  python -m benchmarks.ray_weight_transfer --out DIR            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray
import torch

from benchmarks.common import run_env
from parity.integrations.verl import from_wire, to_wire

# SmolLM2-135M: the embedding, then per layer q, k, v, o, gate, up, down and the two norms.
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536), (576,), (576,)]


def smollm2_tensors(layers: int, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    pairs = [("embed", torch.randn(49152, 576, generator=g).to(dtype))]
    pairs += [(f"layer{i}.{j}", torch.randn(*shape, generator=g).to(dtype))
              for i in range(layers) for j, shape in enumerate(LAYER_SHAPES)]
    return pairs


@ray.remote
class Sink:
    def torch_tensors(self, pairs: list) -> int:
        return sum(int(t.view(-1)[0].item() != 0) for _, t in pairs)

    def wire(self, pairs: list) -> int:
        return sum(int(from_wire(w).view(-1)[0].item() != 0) for _, w in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.layers < 1 or args.repeats < 1:
        ap.error(f"--layers and --repeats must be >= 1, got {args.layers} and {args.repeats}")
    args.out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sink = Sink.remote()
    ray.get([sink.torch_tensors.remote([]), sink.wire.remote([])])
    pairs = smollm2_tensors(args.layers, torch.bfloat16)
    times: dict[str, list[float]] = {"torch tensors": [], "wire (numpy views)": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        ray.get(sink.torch_tensors.remote(pairs))
        times["torch tensors"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ray.get(sink.wire.remote([(name, to_wire(t)) for name, t in pairs]))  # the conversion is timed too
        times["wire (numpy views)"].append(time.perf_counter() - start)
    ray.shutdown()
    result = {"env": run_env("cpu", args), "num_tensors": len(pairs), "parameters": sum(t.numel() for _, t in pairs),
              "dtype": "bfloat16", "seconds": times}
    (args.out / "ray_weight_transfer.json").write_text(json.dumps(result, indent=1))
    print(f"{len(pairs)} tensors, {result['parameters'] / 1e6:.1f}M bf16 parameters, one Ray call per repeat:")
    for name, ts in times.items():
        print(f"  {name:20s} median {statistics.median(ts):.3f} s  ({', '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
    main()
