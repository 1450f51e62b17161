"""Helpers shared by the MoE tests (test_moe.py: Qwen3-MoE, test_moe_archs.py: Mixtral, OLMoE): the prompts, the
initialisation of tiny HF checkpoints, HF's own logprobs of a rollout and a router change that makes a trainer
route differently from the rollout.

Not a test module (pytest collects test_*.py only); imported as `from moe_reference import ...`: pytest (prepend
import mode, no tests/__init__.py) puts tests/ on sys.path.
"""

from __future__ import annotations

import torch

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog. Once upon a time there was a small model"]


@torch.no_grad()
def spread_norms_and_routers(model):
    """Non-trivial norm weights, and routers wide enough that each top-k is decided by clear margins."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif name.endswith("mlp.gate.weight"):
            p.copy_(torch.randn_like(p))
    return model


def hf_logprobs(hf_model, prompt_ids, output_ids):
    """HF's logprob of each output token and HF's argmax at each output position, from one forward."""
    ids = torch.tensor([list(prompt_ids) + list(output_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0].float(), dim=-1)[len(prompt_ids) - 1 : -1]
    return logp.gather(1, torch.tensor(output_ids)[:, None])[:, 0], logp.argmax(dim=-1)


def rerouting_delta(trainer, routed_rollouts) -> tuple[int, torch.Tensor]:
    """(expert e, a change of e's row in the first MoE layer's router) that makes the router pick e for some
    positions where the rollout did not, and leaves e's logit unchanged (to rounding) wherever the rollout
    chose e. With norm_topk_prob the chosen experts' mixing weights depend on their own logits only, so a
    replay of the rollout's experts is unaffected while the trainer's own top-k differs."""
    from parity.trainer.parity_model import token_logprobs

    router = trainer.layers[trainer.config.moe_layers[0]].mlp.gate
    inputs = []
    handle = router.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    token_logprobs(trainer, [r.prompt_ids for r in routed_rollouts], [r.output_ids for r in routed_rollouts])
    handle.remove()
    x = inputs[0].double()
    chosen = torch.cat([r.routed_experts[:, 0].long() for r in routed_rollouts])
    uses = torch.bincount(chosen.reshape(-1), minlength=trainer.config.num_experts)
    e = int(uses.argmin())
    kept = (chosen == e).any(-1)
    basis = torch.linalg.qr(x[kept].T).Q if kept.any() else x.new_zeros(x.shape[1], 0)  # [H, |kept|]
    logits = x @ router.weight.double().T
    gap = logits.topk(2, dim=-1).values[:, -1] - logits[:, e]  # how far e is below the k-th choice
    u = int(torch.where(kept, float("inf"), gap).argmin())
    delta = x[u] - basis @ (basis.T @ x[u])
    delta = delta * (gap[u] + 2.0) / (delta @ x[u])
    return e, delta.float()
