"""The L2 prefetch ahead of a layer's GEMVs (`pdl.prefetch_ahead`): what it asks for, and that a kernel after it still
reads what the kernel before it wrote."""

import pytest
import torch

pytest.importorskip("triton")
from kernel_checks import replays_the_eager_bits_with_dependent_launches  # noqa: E402

from parity.kernels.triton import pdl  # noqa: E402

MB = 2**20


def test_ahead_sectors_take_the_weights_in_order_up_to_the_budget():
    o, gate_up, down = (torch.empty(n, dtype=torch.bfloat16) for n in (2 * MB, 6 * MB, 3 * MB))  # 4, 12, 6 MB
    assert [(w is t, s) for (w, s), t in zip(pdl.ahead_sectors([o, gate_up, down], 24 * MB), (o, gate_up, down, o))] \
        == [(True, 4 * MB // 32), (True, 12 * MB // 32), (True, 6 * MB // 32), (True, 0)]
    # a budget of 10 MB: all of o, the first 6 MB of gate_up, nothing of down
    assert [s for _, s in pdl.ahead_sectors([o, gate_up, down], 10 * MB)] == [4 * MB // 32, 6 * MB // 32, 0, 0]
    assert [s for _, s in pdl.ahead_sectors([o], 16)] == [0, 0, 0, 0]  # less than a sector: nothing


class _RecordedLaunches:
    """Stands in for the Triton kernel: `kernel[grid](*args, **options)` records (grid, args, options)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **options: self.calls.append((grid, args, options))


def test_prefetch_ahead_launches_only_under_dependent_launch(monkeypatch):
    """Plain launches run one kernel at a time, so there a prefetch would only delay the next kernel: none is
    launched. Under dependent launch one kernel is, one program per SM, with the launch options."""
    kernel = _RecordedLaunches()
    monkeypatch.setattr(pdl, "_prefetch_ahead_kernel", kernel)
    monkeypatch.setattr(pdl, "PREFETCH_ENABLED", True)
    monkeypatch.setattr(pdl.torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132}))
    w = torch.empty(4096, dtype=torch.bfloat16)
    assert not pdl.LAUNCH
    pdl.prefetch_ahead([w])
    assert kernel.calls == []
    monkeypatch.setitem(pdl.LAUNCH, "launch_pdl", True)
    pdl.prefetch_ahead([w])
    (grid, args, options), = kernel.calls
    assert grid == (132,) and args[:2] == (w, 4096 * 2 // 32) and args[3::2] == (0, 0, 0)
    assert options["launch_pdl"] is True


@pytest.mark.gpu
def test_gpu_prefetch_ahead_between_two_kernels_keeps_their_order():
    """norm -> prefetch ahead -> GEMV -> GEMV, captured with dependent launch as a decode graph is: the prefetch kernel
    lets the GEMV launch at once, and the GEMV must still read the norm's output (its wait is for the prefetch, which
    waits for the norm). The replay of x zeroed differs, x restored gives the eager bits."""
    from parity.kernels.triton import gemv as tg
    from parity.kernels.triton import norm as tn

    gen = torch.Generator(device="cuda").manual_seed(37)
    x = torch.randn(1, 1024, generator=gen, device="cuda").bfloat16()
    w_up = (torch.randn(3072, 1024, generator=gen, device="cuda") * 1024**-0.5).bfloat16()
    w_down = (torch.randn(1024, 3072, generator=gen, device="cuda") * 3072**-0.5).bfloat16()
    norm_w = torch.randn(1024, generator=gen, device="cuda").bfloat16()

    def chain():
        h = tn.rms_norm(x, norm_w, 1e-6)
        pdl.prefetch_ahead([w_up, w_down])
        return tg.gemv(tg.gemv(h, w_up), w_down)

    replays_the_eager_bits_with_dependent_launches(chain, x)
