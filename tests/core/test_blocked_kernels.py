"""The blocked CPU kernels (EmoAiry: row blocks and stacks; EmoCats: flat blocks) equal the
reference.

Small block and stack sizes force every arrangement onto small tensors: matrices split into
blocks, stacks of LoRA-like pairs, 3-D, channels-last and non-contiguous parameters, zero
rows, an all-zero gradient, vectors and scalars; skipped steps must leave everything bitwise.
"""

from __future__ import annotations

import pytest
import torch

from emo_core import EmoAiry, EmoCats
from emo_core import _base as base
from emo_core import _emoairy_blocked as blocked
from tests.core.cases import scripted_losses
from tests.reference import ReferenceOptimizer

ALL_ZERO = 7  # index of the parameter whose gradient is all zero for the first 10 steps
BAD_STEPS = {7: float("nan"), 21: float("inf")}


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(60, 40), (64, 33), (6, 4, 5), (5,), (), (4, 1)] + [(8, 64), (64, 8)] * 6
    params = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    params.append(torch.randn(30, 20, generator=gen).t())  # non-contiguous
    params.append(torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last))
    return params


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    grads[1][:5] = 0  # zero rows
    if step < 10:
        grads[ALL_ZERO].zero_()  # e.g. LoRA's A while B is still zero
    if step in BAD_STEPS:
        grads[0][3, 4] = BAD_STEPS[step]
    return grads


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.int32)  # -0.0 and +0.0 differ here


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("emoairy", (7, 7)), ("emoairy", (1 << 10, 1 << 12)), ("emocats", (7, 0))],
    ids=["emoairy-tiny-blocks", "emoairy-stacks", "emocats-tiny-blocks"],
)
def test_blocked_kernel_matches_reference_and_skips_bitwise(name, sizes, monkeypatch) -> None:
    monkeypatch.setattr(blocked, "BLOCK", sizes[0])
    monkeypatch.setattr(blocked, "STACK", sizes[1])
    if name == "emocats":  # which tensors count as large (split_large) and the block size
        monkeypatch.setattr(base, "CPU_BLOCK", sizes[0])
    ours = [torch.nn.Parameter(t) for t in _params()]
    theirs = _params()
    assert not ours[-2].is_contiguous() and not ours[-1].is_contiguous()
    # (the reference is SPEC's: v3.7's pulse, no averaging)
    opt = {"emoairy": EmoAiry, "emocats": EmoCats}[name](ours, pulse="v37")
    ref = ReferenceOptimizer(name, theirs)
    for step, loss in enumerate(scripted_losses(40)):
        for p, q, g in zip(ours, theirs, _grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        before = [p.detach().clone() for p in ours]
        state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in ours]
        opt.step(loss=loss)
        ref.step(loss)
        if step in BAD_STEPS:
            for p, old, state in zip(ours, before, state_before):
                assert torch.equal(_bits(p.detach()), _bits(old))
                assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if i == ALL_ZERO and name == "emoairy":  # the reference divides 0 by mean(R) = 0
            assert torch.isfinite(a).all()
            continue
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-6)
