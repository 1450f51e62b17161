"""verl's entry point (group `verl.plugins`, loaded by `import verl`): registers `rollout.name=parity`.

Importing this module is the registration: verl loads each entry point and ignores what it returns. It
names classes by path only, so `import verl` stays cheap; `parity.integrations.verl` is imported when verl
first asks for the rollout class or the replica.
"""

from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry

ROLLOUT_NAME = "parity"


def _load_replica():
    from parity.integrations.verl import ParityReplica

    return ParityReplica


_ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "parity.integrations.verl.ServerAdapter"
RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
