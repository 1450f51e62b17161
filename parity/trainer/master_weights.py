"""AdamW on float32 master weights of a model that computes in bf16 (or fp16).

Training parity's own model exactly means computing in the engine's dtype with the engine's weights:
the model's parameters are the half-precision values the engine holds. The updates must not be
rounded to half precision, though (an Adam step of lr = 2e-5 on a weight of 0.02 is below bf16's
resolution there and would be lost), so the optimizer keeps a float32 copy of every half-precision
parameter (mixed-precision training's usual master weights; FSDP2 does the same with `MixedPrecisionPolicy`):
- each gradient is moved into its master's float32 `.grad` as soon as backward has accumulated it
  (a post-accumulate-grad hook; the half-precision `.grad` is freed), so clipping and the step see
  float32 gradients: clip `optimizer.master_params`, not the model's parameters;
- `step()` updates the masters and writes them back into the model rounded to its dtype (round to
  nearest even, the rounding the engine's weight sync applies to a float32 source).
Float32 parameters are their own masters. The state dict holds AdamW's moments, not the masters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _move_grad_to(master: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        grad = param.grad.float()
        master.grad = grad if master.grad is None else master.grad.add_(grad)
        param.grad = None

    return hook


class MasterWeightAdamW(torch.optim.AdamW):
    def __init__(self, params: Iterable[torch.nn.Parameter], **adamw_kwargs):
        self.model_params = [p for p in params if p.requires_grad]
        if not self.model_params:
            raise ValueError("MasterWeightAdamW got no parameter that requires grad")
        self.master_params: list[torch.Tensor] = []
        self._hooks = []
        for p in self.model_params:
            if p.dtype == torch.float32:
                self.master_params.append(p)
                continue
            master = p.detach().float().requires_grad_(True)
            self._hooks.append(p.register_post_accumulate_grad_hook(_move_grad_to(master)))
            self.master_params.append(master)
        super().__init__(self.master_params, **adamw_kwargs)

    def release(self) -> None:
        """Stop collecting the model's gradients (before another optimizer takes the same parameters)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for p, master in zip(self.model_params, self.master_params):
            if master is not p:
                p.copy_(master)
        return loss
