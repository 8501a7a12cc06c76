"""Memory layout: every kernel updates the same logical element, whatever the strides.

torch's fused AdamW kernel (EmoSens's default) and the blocked CPU kernels (large fp32
tensors) pair a parameter, its gradient and its state by memory position. Before, a
gradient assigned in another layout than its parameter's, or state loaded from a checkpoint
of another layout (a model resumed with ``channels_last``, or the reverse), mixed elements up
(EmoSens, relative error of the update ~1) or failed (EmoCats: "view size is not compatible").
Each case is checked against the per-tensor kernel (``foreach=False``), which indexes
logically, on the same run; ``lr=100`` makes the updates large against the weights'
rounding, so that the kernels' own rounding differences stay far below the tolerance.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from emo_core import EmoAiry, EmoCats, EmoSens

# Large enough (>= CPU_BLOCK elements) for the blocked CPU kernels, and a small one.
CHANNELS = (4, 128)
CONFIGS = [
    pytest.param(EmoSens, {"lr": 100.0}, id="emosens"),
    pytest.param(EmoSens, {"lr": 100.0, "pulse": "distance", "average": True}, id="emosens-avg"),
    pytest.param(EmoCats, {"lr": 100.0}, id="emocats"),
    pytest.param(EmoCats, {"lr": 100.0, "pulse": "distance", "average": True}, id="emocats-avg"),
    pytest.param(EmoAiry, {"lr": 100.0}, id="emoairy"),
]
TOLERANCE = 5e-2  # of the update; a mixed-up update is off by about its own size
CL, CF = torch.channels_last, torch.contiguous_format


def _conv(channels: int) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(channels, channels, 3)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _resumed_update(
    optimizer: type, options: dict[str, Any], channels: int, before: Any, after: Any
) -> tuple[torch.Tensor, torch.optim.Optimizer, torch.nn.Module]:
    """Train in layout ``before``, checkpoint, resume in layout ``after`` and train on: the
    weight's update after the resume, the resumed optimizer and its model."""
    x = torch.randn(2, channels, 6, 6, generator=torch.Generator().manual_seed(1))
    model = _conv(channels).to(memory_format=before)
    opt = optimizer(model.parameters(), **options)
    _train(model, opt, x)
    saved, weights = _roundtrip(opt.state_dict()), _roundtrip(model.state_dict())
    resumed = _conv(channels)
    resumed.load_state_dict(weights)
    resumed.to(memory_format=after)
    opt = optimizer(resumed.parameters(), **options)
    opt.load_state_dict(saved)
    start = resumed.weight.detach().clone()
    _train(resumed, opt, x)
    return resumed.weight.detach() - start, opt, resumed


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize(("before", "after"), [(CF, CL), (CL, CF)], ids=["to-cl", "from-cl"])
@pytest.mark.parametrize(("optimizer", "options"), CONFIGS)
def test_a_checkpoint_resumed_in_another_memory_format_updates_the_right_elements(
    optimizer: type, options: dict[str, Any], before: Any, after: Any, channels: int
) -> None:
    update, opt, model = _resumed_update(optimizer, options, channels, before, after)
    reference, *_ = _resumed_update(
        optimizer, {**options, "foreach": False}, channels, before, after
    )
    assert _relative(update, reference) < TOLERANCE
    # The state now has its parameter's layout, so the fast kernels are used again.
    for p in model.parameters():
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert value.stride() == p.stride()


@pytest.mark.parametrize(("optimizer", "options"), CONFIGS)
def test_a_model_moved_to_channels_last_mid_run_updates_the_right_elements(
    optimizer: type, options: dict[str, Any]
) -> None:
    x = torch.randn(2, 128, 6, 6, generator=torch.Generator().manual_seed(1))

    def update(extra: dict[str, Any]) -> torch.Tensor:
        model = _conv(128)
        opt = optimizer(model.parameters(), **options, **extra)
        _train(model, opt, x)
        model.to(memory_format=CL)  # the parameters change layout under the optimizer
        start = model.weight.detach().clone()
        _train(model, opt, x)
        return model.weight.detach() - start

    assert _relative(update({}), update({"foreach": False})) < TOLERANCE


@pytest.mark.parametrize("numel", [5, 50_000])
@pytest.mark.parametrize(("optimizer", "options"), CONFIGS)
def test_a_gradient_assigned_in_another_layout_than_its_parameter(
    optimizer: type, options: dict[str, Any], numel: int
) -> None:
    """A transposed (non-contiguous) parameter, and ordinary contiguous gradients set by
    hand: the same update as the contiguous parameter with the same values."""
    torch.manual_seed(0)
    base = torch.randn(numel, 3)

    def update(transposed: bool) -> torch.Tensor:
        p = torch.nn.Parameter(base.t() if transposed else base.t().contiguous())
        start = p.detach().clone()
        opt = optimizer([p], **options)
        for k in range(3):
            p.grad = torch.randn(3, numel, generator=torch.Generator().manual_seed(10 + k))
            opt.step(loss=1.0 / (k + 1))
        return p.detach() - start

    assert _relative(update(True), update(False)) < TOLERANCE


def test_fused_true_names_the_layout_when_a_gradient_does_not_match() -> None:
    p = torch.nn.Parameter(torch.randn(5, 3).t())
    p.grad = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"fused=True.*memory layout"):
        EmoSens([p], fused=True).step(loss=1.0)


@pytest.mark.parametrize(("optimizer", "options"), CONFIGS)
def test_a_parameter_with_gaps_in_memory_trains_and_keeps_its_state_tensors(
    optimizer: type, options: dict[str, Any]
) -> None:
    """``Parameter(big[:, ::2])``: its state is compact (no layout to copy it into), so the
    step takes the logical kernels and leaves the state tensors in place, step after step."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))

    def update(extra: dict[str, Any]) -> tuple[torch.Tensor, list[set[int]]]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 128)[:, ::2])
        start = p.detach().clone()
        opt = optimizer([p], **options, **extra)
        seen = []
        for _ in range(3):
            loss = (x @ p).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss)
            seen.append({id(v) for v in opt.state[p].values() if isinstance(v, torch.Tensor)})
        return p.detach() - start, seen

    (got, seen), (reference, _) = update({}), update({"foreach": False})
    assert _relative(got, reference) < TOLERANCE
    assert seen[1] == seen[2]


def test_a_mis_shaped_state_is_refused_whatever_the_layout() -> None:
    """The shape check comes before the layout decision: a state edited to the wrong shape
    on a non-contiguous parameter is refused like on a contiguous one."""
    p = torch.nn.Parameter(torch.randn(8, 6).t())
    opt = EmoSens([p])
    p.grad = torch.ones_like(p)
    opt.step(loss=1.0)
    before = p.detach().clone()
    opt.state[p]["exp_avg_sq"] = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"state\['exp_avg_sq'\] of shape \(4,\)"):
        opt.step(loss=1.0)
    assert torch.equal(p.detach(), before)
