"""The loss-spike probe measures what a one-step 10x loss does to the effective LR."""

from __future__ import annotations

import pytest
import torch

from emo_bench.contenders import Contender
from emo_bench.spike import spike_response


class BoldDriver(torch.optim.SGD):
    """SGD that halves its LR when the loss jumps above 3x its running mean, then regrows
    it by 10% a step up to the base LR: a known cut-and-recover reference."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.base, self.mean = lr, None

    def step(self, loss: torch.Tensor) -> None:  # type: ignore[override]
        value = float(loss)
        group = self.param_groups[0]
        if self.mean is not None and value > 3 * self.mean:
            group["lr"] *= 0.5
        else:
            group["lr"] = min(self.base, group["lr"] * 1.1)
            self.mean = value if self.mean is None else 0.9 * self.mean + 0.1 * value
        super().step()


class BoldContender(Contender):
    def step(self, opt, loss) -> None:
        opt.step(loss.detach())


def test_a_constant_lr_is_unchanged_by_the_spike() -> None:
    r = spike_response(lambda ps: torch.optim.AdamW(ps, lr=1e-3), spike_step=20)
    assert r.lr_before == r.lr_after == r.lr_recovered == pytest.approx(1e-3)
    assert len(r.lrs) == 71


def test_a_cut_and_its_recovery_are_measured() -> None:
    bold = BoldContender("bold", "custom", lambda ps: BoldDriver(ps, lr=0.1), 0.1)
    r = spike_response(bold, spike_step=30)
    assert r.lr_after == pytest.approx(0.5 * r.lr_before)
    assert r.lr_recovered == pytest.approx(r.lr_before)
    with pytest.raises(ValueError, match="Invalid spike_step: 3"):
        spike_response(bold, spike_step=3)
