"""Rollout over several processes: data-parallel engines, tensor-parallel engines, a Ray actor.

Launch with `torchrun` or `accelerate launch`; `init_distributed()` joins the job (see docs/distributed.md).
"""

from parity.distributed.comm import init_distributed, rank_device
from parity.distributed.data_parallel import DataParallelRollout
from parity.distributed.tensor_parallel import TensorParallelDecoder, TPEngine

__all__ = ["DataParallelRollout", "TPEngine", "TensorParallelDecoder", "init_distributed", "rank_device"]
