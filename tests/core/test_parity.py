"""Every implementation of every optimizer equals the literal reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

from tests.core.cases import ALL_IMPLS, OPTIMIZERS, impl_id, scripted_losses, set_random_grads
from tests.reference import ReferenceOptimizer


def _twins(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 2, 3), (), (4, 1), (1,)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    return [t.clone() for t in base], [t.clone() for t in base]


@pytest.mark.parametrize("use_shadow", [False, True], ids=["plain", "shadow"])
@pytest.mark.parametrize("case", ALL_IMPLS, ids=impl_id)
def test_matches_reference_for_50_steps(case: tuple[str, dict], use_shadow: bool) -> None:
    name, impl = case
    ours, theirs = _twins()
    # the reference is SPEC §2's v3.7 pulse
    opt = OPTIMIZERS[name](ours, pulse="v37", use_shadow=use_shadow, **impl)
    ref = ReferenceOptimizer(name, theirs, use_shadow=use_shadow)
    for step, loss in enumerate(scripted_losses(50)):
        set_random_grads(ours, step)
        set_random_grads(theirs, step)
        opt.step(loss=loss)
        ref.step(loss)
        assert opt.get_effective_lr()[0] == pytest.approx(ref.sensor.pulse, rel=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert opt.telemetry()["scalar"] == pytest.approx(ref.sensor.sigma, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_all_implementations_agree(name: str) -> None:
    """foreach, per-tensor loops, compiled loops (and EmoSens's fused kernel) agree."""
    runs = []
    for impl in [{"foreach": False}, {"foreach": True}, {"compile_update": True}] + (
        [{"fused": True}] if name == "emosens" else []
    ):
        params, _ = _twins(seed=3)
        opt = OPTIMIZERS[name](params, use_shadow=True, **impl)
        for step, loss in enumerate(scripted_losses(30)):
            set_random_grads(params, step)
            opt.step(loss=loss)
        runs.append(params)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
