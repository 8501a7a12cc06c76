"""The ``pulse="distance"`` controller (emo_core/distance.md): finds the scale, brakes on
spikes, and keeps every contract of the step (no syncs, exact resume, bitwise skips)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from emo_core import EmoAiry, EmoCats, EmoSens
from emo_core.distance import (
    D0,
    SAMPLE_SIZE,
    SAMPLE_TENSORS,
    distance_update,
    gather_sample,
    init_distance_state,
    plan_sample,
)
from tests.core.cases import (
    ALL_IMPLS,
    NAMES,
    OPTIMIZERS,
    assert_bad_step_is_a_no_op,
    assert_same,
    fresh_compile_cache,
    impl_id,
    scripted_losses,
    set_random_grads,
    small_model,
    train_scripted,
)
from tests.core.test_no_sync import count_host_reads

DISTANCE = {"pulse": "distance"}
SENSOR = {"ema_short": 1.0, "ema_medium": 1.0, "ema_long": 1.0}  # a flat loss: no brake


def _regression(target: float, seed: int = 0, steps: int = 150, name: str = "emosens", **kw):
    """Noisy least squares whose solution sits ``target`` away from the start per
    coordinate; returns (optimizer, effective LR per step, params)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(32, 16, requires_grad=True)
    true_w = target * torch.sign(torch.randn(32, 16, generator=gen))
    opt = OPTIMIZERS[name]([w], **{**DISTANCE, **kw})
    lrs = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen)
        y = x @ true_w.T + 0.01 * torch.randn(64, 32, generator=gen)
        loss = ((x @ w.T - y) ** 2).mean()
        w.grad = None
        loss.backward()
        opt.step(loss=loss.detach())
        lrs.append(opt.get_effective_lr()[0])
    return opt, lrs, w


@pytest.mark.parametrize("name", NAMES)
def test_the_lr_grows_from_its_warm_start_to_the_problems_scale(name: str) -> None:
    """Far solution (distance 1): the LR climbs four orders of magnitude above D0; near
    solution (1e-3, the fine-tuning case): it stays ~1000x smaller."""
    _, far, w_far = _regression(1.0, name=name)
    _, near, _ = _regression(1e-3, name=name)
    assert far[0] == pytest.approx(D0)
    assert max(far) > 1e4 * D0
    assert max(near) < max(far) / 100
    assert max(far) < 1.0  # far below the cap


def test_the_solution_is_reached_without_tuning() -> None:
    opt, _, w = _regression(1.0, steps=300)
    final = opt.telemetry()["ema_short"]
    first = opt.telemetry()["ema_long"]
    assert final < 0.01 * first


def test_a_one_step_10x_loss_spike_cuts_the_lr_and_it_recovers() -> None:
    """The spec's spike test: the sensor's brake multiplies into the found scale."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(16, 8, requires_grad=True)
    true_w = torch.randn(16, 8, generator=gen)
    opt = EmoSens([w], **DISTANCE)
    lrs = []
    for step in range(200):
        x = torch.randn(64, 8, generator=gen)
        loss = ((x @ w.T - x @ true_w.T) ** 2).mean() + 1.0
        w.grad = None
        loss.backward()
        fed = loss.detach() * (10.0 if step == 150 else 1.0)
        opt.step(loss=fed)
        lrs.append(opt.get_effective_lr()[0])
    assert lrs[150] < lrs[149] / 5  # cut several-fold on the spike step
    assert lrs[149] > 100 * D0  # (the scale had been found before)
    assert lrs[175] > 0.8 * lrs[149]  # and back within 25 steps
    assert opt.telemetry()["d"] >= 0  # the sensor's own statistics are still reported


def _scaled_fit(make, factor: float, steps: int) -> tuple[list[float], torch.Tensor]:
    """A noisy linear fit whose loss is multiplied by ``factor``; ``make([w])`` builds the
    optimizer. Returns the effective LR per step and the final weights."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(8, 4, requires_grad=True)
    true_w = torch.randn(8, 4, generator=gen)
    opt = make([w])
    lrs = []
    for _ in range(steps):
        x = torch.randn(32, 4, generator=gen)
        loss = factor * ((x @ w.T - x @ true_w.T) ** 2).mean()
        w.grad = None
        loss.backward()
        opt.step(loss=loss.detach())
        lrs.append(opt.get_effective_lr()[0])
    return lrs, w.detach()


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_multiplying_the_loss_by_a_constant_keeps_the_trajectory(scale: float) -> None:
    def make(params):
        return EmoSens(params, eps=1e-30, **DISTANCE)

    lrs, w = _scaled_fit(make, 1.0, steps=60)
    scaled_lrs, scaled_w = _scaled_fit(make, scale, steps=60)
    assert scaled_lrs == pytest.approx(lrs, rel=1e-4)
    torch.testing.assert_close(scaled_w, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("average", [False, True])
def test_a_small_loss_scaled_by_a_power_of_two_keeps_the_trajectory_bitwise(average: bool) -> None:
    """EmoCats has no eps, so a loss scaled by 2**-27 (gradients exactly scaled, losses ~1e-9)
    must give the same run bit for bit. The brake compared the loss's EMAs against an absolute
    1e-5 floor (SPEC's, for σ), which changed the LR once the loss was smaller than that."""

    def make(params):
        return EmoCats(params, average=average, **DISTANCE)

    lrs, w = _scaled_fit(make, 1e-3, steps=80)  # losses around 1e-3: above the old floor
    scaled_lrs, scaled_w = _scaled_fit(make, 1e-3 * 2.0**-27, steps=80)
    assert scaled_lrs == lrs
    assert torch.equal(scaled_w, w)


@pytest.mark.parametrize("name", NAMES)
def test_a_negative_loss_trains(name: str) -> None:
    """A log-likelihood-style loss below zero: the scale is found and the loss falls."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(8, 4, requires_grad=True)
    true_w = torch.randn(8, 4, generator=gen)
    opt = OPTIMIZERS[name]([w], **DISTANCE)
    losses = []
    for _ in range(200):
        x = torch.randn(32, 4, generator=gen)
        loss = ((x @ w.T - x @ true_w.T) ** 2).mean() - 50.0
        w.grad = None
        loss.backward()
        opt.step(loss=loss.detach())
        losses.append(float(loss.detach()))
    assert all(v < 0 for v in losses[-10:])
    assert losses[-1] < losses[0] - 0.9 * (losses[0] + 50.0)
    assert opt.get_effective_lr()[0] > 100 * D0


@pytest.mark.parametrize("case", ALL_IMPLS + [(n, {}) for n in NAMES], ids=impl_id)
def test_step_makes_no_host_reads(case: tuple[str, dict]) -> None:
    name, impl = case
    fresh_compile_cache(impl)
    params = list(small_model().parameters())
    opt = OPTIMIZERS[name](params, use_shadow=True, **DISTANCE, **impl)
    for step, loss in enumerate(scripted_losses(5)):
        set_random_grads(params, step)
        with count_host_reads() as counts:
            opt.step(loss=torch.tensor(loss))
        assert sum(counts.values()) == 0, dict(counts)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["nan_loss", "nan_grad", "inf_grad"])
def test_a_skipped_step_is_a_bitwise_no_op(name: str, bad: str) -> None:
    model = small_model()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params, **DISTANCE)
    for step, loss in enumerate(scripted_losses(4)):
        set_random_grads(params, step)
        opt.step(loss=loss)
    assert "emo_distance" in assert_bad_step_is_a_no_op(model, opt, bad, step=4)


def _reference_and_halfway(name: str) -> tuple[tuple, tuple]:
    """(model, optimizer) after 30 scripted steps, and a twin after the first 15."""
    ref_model = small_model()
    ref = OPTIMIZERS[name](ref_model.parameters(), **DISTANCE)
    train_scripted(ref_model, ref, range(30))
    model = small_model()
    opt = OPTIMIZERS[name](model.parameters(), **DISTANCE)
    train_scripted(model, opt, range(15))
    return (ref_model, ref), (model, opt)


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bitwise_exact(name: str) -> None:
    (ref_model, ref), (model, opt) = _reference_and_halfway(name)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model = small_model(seed=5)
    fresh_model.load_state_dict(saved["model"])
    fresh = OPTIMIZERS[name](fresh_model.parameters(), **DISTANCE)
    fresh.load_state_dict(saved["opt"])
    train_scripted(fresh_model, fresh, range(15, 30))
    assert_same(fresh_model.state_dict(), ref_model.state_dict())
    assert_same(fresh.emo_state["emo_distance"], ref.emo_state["emo_distance"])
    assert fresh.get_effective_lr() == ref.get_effective_lr()


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_whose_storage_is_replaced_is_sampled_afresh(name: str) -> None:
    """The sample keeps its views of the parameters between steps; ``p.data = ...`` (a
    framework moving or re-materialising weights) must be read from the new storage."""
    (ref_model, ref), (model, opt) = _reference_and_halfway(name)
    for p in model.parameters():
        p.data = p.data.clone()  # the old storage stops being updated
    train_scripted(model, opt, range(15, 30))
    assert_same(model.state_dict(), ref_model.state_dict())
    assert_same(opt.emo_state["emo_distance"], ref.emo_state["emo_distance"])


CONTROLLER_CORRUPTIONS = {
    "nan scale": (lambda d: d.update(d=torch.tensor(float("nan"), dtype=d["d"].dtype)), "'d'"),
    "missing key": (lambda d: d.pop("num"), "lacks 'num'"),
    "unknown key": (lambda d: d.update(extra=torch.zeros(())), "unknown entries"),
    "short sample": (lambda d: d.update(s=d["s"][:-1]), "'s'"),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(CONTROLLER_CORRUPTIONS))
def test_a_corrupt_controller_state_is_refused_and_changes_nothing(name: str, case: str) -> None:
    model = small_model()
    opt = OPTIMIZERS[name](model.parameters(), **DISTANCE)
    train_scripted(model, opt, range(5))
    saved = copy.deepcopy(opt.state_dict())
    corrupt, message = CONTROLLER_CORRUPTIONS[case]
    corrupt(saved["param_groups"][0]["emo_state"]["emo_distance"])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"Invalid state_dict: .*emo_distance.*{message}"):
        opt.load_state_dict(saved)
    assert_same(opt.state_dict(), before)
    train_scripted(model, opt, range(5, 7))  # still steps


def test_the_sample_is_bounded_and_state_is_about_zero_bytes_per_parameter() -> None:
    """400 LoRA-sized tensors: at most SAMPLE_SIZE coordinates (a ~constant footprint)."""
    params = [torch.zeros(8, 1024) if i % 2 else torch.zeros(1024, 8) for i in range(400)]
    for p in params:
        p.requires_grad_(True)
    opt = EmoAiry(params, **DISTANCE)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step(loss=1.0)
    state = opt.emo_state["emo_distance"]
    extra = sum(t.numel() * t.element_size() for t in state.values())
    n = sum(p.numel() for p in params)
    assert extra / n < 0.25  # bytes per parameter
    plan = plan_sample(opt.param_groups, torch.device("cpu"), 1)
    assert plan.size <= SAMPLE_SIZE * 1.1
    assert len(plan.pieces) <= SAMPLE_TENSORS
    # both kinds of tensor (8x1024 and 1024x8) are sampled, weighted to the whole model
    assert {params[p.index].shape for p in plan.pieces} == {(8, 1024), (1024, 8)}
    assert float(plan.weights.sum()) == pytest.approx(n, rel=1e-6)


def test_small_models_are_sampled_completely() -> None:
    params = list(small_model().parameters())
    plan = plan_sample([{"params": params}], torch.device("cpu"), 1)
    assert plan.size == sum(p.numel() for p in params)
    assert torch.all(plan.weights == 1.0)


def test_lr_is_a_plain_multiplier_after_everything() -> None:
    """Constructor lr, group lr and an LR scheduler all scale the automatic LR linearly."""

    def lrs(**kw) -> list[float]:
        opt, out, _ = _regression(1.0, steps=40, **kw)
        return out

    base = lrs()
    half = lrs(lr=0.5)
    assert half[0] == pytest.approx(0.5 * base[0])
    # v3.7 at its cap: lr=0.5 now halves the effective LR (it was a no-op under the clamp)
    p = torch.zeros(3, requires_grad=True)
    capped = EmoSens([p], lr=0.5, pulse="v37")
    sched = torch.optim.lr_scheduler.LambdaLR(capped, lambda epoch: 0.1 if epoch >= 60 else 1.0)
    for _ in range(60):  # a flat loss: the pulse sits at max_lr
        p.grad = torch.zeros(3)
        capped.step(loss=1.0)
        sched.step()
    assert capped.get_effective_lr()[0] == pytest.approx(0.5e-3)
    p.grad = torch.zeros(3)
    capped.step(loss=1.0)  # the scheduler's factor applies from this step on
    assert capped.get_effective_lr()[0] == pytest.approx(0.05e-3)


def _scheduled(name: str, factor, steps: int, **kw) -> tuple[list[float], list[float], float]:
    """:func:`_regression` (solution 1 away) with ``LambdaLR(factor)``: the scale ``d`` and
    the applied LR per step, and the final loss."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(32, 16, requires_grad=True)
    true_w = torch.sign(torch.randn(32, 16, generator=gen))
    opt = OPTIMIZERS[name]([w], **{**DISTANCE, **kw})
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    scales, applied = [], []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen)
        loss = ((x @ w.T - x @ true_w.T) ** 2).mean()
        w.grad = None
        loss.backward()
        opt.step(loss=loss.detach())
        schedule.step()
        scales.append(float(opt.emo_state["emo_distance"]["d"][0]))
        applied.append(opt.get_effective_lr()[0])
    return scales, applied, float(loss)


@pytest.mark.parametrize("name", NAMES)
def test_a_warmup_scales_the_applied_lr_not_the_scale_it_finds(name: str) -> None:
    """The scale is measured from the distance travelled, counted as if ``lr`` were 1: a
    warmup's small factors used to slow the parameters and with them the estimate (``d`` at
    step 50 of a 100-step warmup was 1e4x smaller than without one)."""
    plain, plain_lr, _ = _scheduled(name, lambda step: 1.0, 60)
    warm, warm_lr, _ = _scheduled(name, lambda step: min(1.0, (step + 1) / 100), 60)
    assert plain[49] > 100 * D0
    assert 0.5 < warm[49] / plain[49] < 4.0
    factor = 50 / 100  # the applied LR of step 50 carries the warmup's factor
    assert warm_lr[50] == pytest.approx(factor * warm[49] / plain[49] * plain_lr[50], rel=0.5)


@pytest.mark.parametrize("name", NAMES)
def test_a_state_saved_before_the_lr_units_existed_resumes_exactly(name: str) -> None:
    """Without ``x_prev``/``m_prev`` a state loads as if the last step's ``lr`` was 1; at
    ``lr = 1`` the shift is 0, so the run continues bitwise as if never interrupted."""
    ref_model, model = small_model(), small_model()
    ref = OPTIMIZERS[name](ref_model.parameters(), **DISTANCE)
    opt = OPTIMIZERS[name](model.parameters(), **DISTANCE)
    train_scripted(ref_model, ref, range(12))
    train_scripted(model, opt, range(6))
    saved = copy.deepcopy(opt.state_dict())
    controller = saved["param_groups"][0]["emo_state"]["emo_distance"]
    del controller["x_prev"], controller["m_prev"]
    fresh_model = small_model(seed=3)
    fresh_model.load_state_dict(model.state_dict())
    fresh = OPTIMIZERS[name](fresh_model.parameters(), **DISTANCE)
    fresh.load_state_dict(saved)
    train_scripted(fresh_model, fresh, range(6, 12))
    assert_same(fresh_model.state_dict(), ref_model.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_a_small_constant_lr_does_not_stall_the_scale(name: str) -> None:
    """``lr=0.1``: the parameters move 10x less per step, and the estimate with them; it
    stayed near D0 for good on EmoAiry and EmoCats (a loss that never fell)."""
    _, _, start = _scheduled(name, lambda step: 1.0, 1)
    scales, _, final = _scheduled(name, lambda step: 1.0, 300, lr=0.1)
    assert scales[-1] > 100 * D0
    assert final < 0.05 * start


def test_state_dicts_saved_with_the_old_scope_key_still_load() -> None:
    p = torch.zeros(3, requires_grad=True)
    opt = EmoSens([p], pulse="v37")
    p.grad = torch.zeros(3)
    opt.step(loss=1.0)
    sd = opt.state_dict()
    sd["param_groups"][0]["scope"] = 1.0  # as saved before lr became a plain multiplier
    fresh = EmoSens([torch.zeros(3, requires_grad=True)], pulse="v37")
    fresh.load_state_dict(sd)
    assert fresh.get_effective_lr() == opt.get_effective_lr()


def test_bad_pulse_raises_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"Invalid pulse: 'fast' \(expected one of distance, v37\)"
    ):
        EmoCats([torch.zeros(2, requires_grad=True)], pulse="fast")


def _two_networks(noise: float, steps: int = 120, name: str = "emosens", **kw):
    """A "UNet" group (the regression of :func:`_regression`, solution 1 away) trained beside
    a "text encoder" group whose gradients are pure noise of size ``noise`` (as a LoRA that
    barely affects the loss); returns the effective LR of each group per step."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(32, 16, requires_grad=True)
    encoder = torch.zeros(64, 64, requires_grad=True)
    true_w = torch.sign(torch.randn(32, 16, generator=gen))
    groups = [{"params": [encoder]}, {"params": [w]}] if noise else [{"params": [w]}]
    opt = OPTIMIZERS[name](groups, **{**DISTANCE, **kw})
    lrs = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen)
        loss = ((x @ w.T - x @ true_w.T) ** 2).mean()
        w.grad = None
        loss.backward()
        encoder.grad = noise * torch.randn(64, 64, generator=gen)
        opt.step(loss=loss.detach())
        lrs.append(opt.get_effective_lr())
    return lrs


@pytest.mark.parametrize("name", NAMES)
def test_each_param_group_finds_its_own_scale(name: str) -> None:
    """kohya's LoRA: a text-encoder group whose gradients are noise beside the UNet's. One
    scale for both was held near D0 by the noise group (measured in sd-scripts: LR 1e-5,
    the loss barely moved, against 1e-2 for the UNet alone); each group's own scale lets the
    UNet's grow as it does alone, while the noise group's stays small."""
    alone = [lr[0] for lr in _two_networks(0.0, name=name)]
    beside = _two_networks(10.0, name=name)
    unet, encoder = [lr[1] for lr in beside], [lr[0] for lr in beside]
    assert max(unet) > 1e4 * D0
    assert max(unet) == pytest.approx(max(alone), rel=0.05)
    assert max(encoder) < max(unet) / 30


def test_every_param_group_is_sampled_as_if_it_were_alone() -> None:
    """Tensors are sampled in proportion to size, but per group: a group of small tensors
    (biases, norms: HF's no-decay group) beside 40 large ones has its own sample, the one
    it would have alone, so a group's scale does not depend on what else is trained."""
    big = [torch.zeros(256, 256, requires_grad=True) for _ in range(40)]
    small = [torch.zeros(256, requires_grad=True) for _ in range(40)]
    plan = plan_sample([{"params": big}, {"params": small}], torch.device("cpu"), 1)
    for j, params in enumerate((big, small)):
        alone = plan_sample([{"params": params}], torch.device("cpu"), 1)
        members = plan.groups == j
        assert torch.equal(plan.weights[members], alone.weights)
        assert float(alone.weights.sum()) == pytest.approx(sum(p.numel() for p in params))
        assert [(p.index, p.stride) for p in plan.pieces if p.group == j] == [
            (p.index, p.stride) for p in alone.pieces
        ]
    assert len(plan.pieces) <= 2 * SAMPLE_TENSORS and plan.size <= 2 * SAMPLE_SIZE * 1.1


def test_a_repeating_layout_is_not_aliased_by_the_tensor_sample() -> None:
    """Pairs (down, up, down, up, ...) of equal size, 4x the tensors the sample reads:
    evenly spaced positions over that order land on one kind only (every 4th tensor, all
    downs); the sample must read both, as the zero-initialised ups are the only ones with a
    gradient at first."""
    n = 4 * SAMPLE_TENSORS
    params = [torch.zeros(4, 8) if i % 2 == 0 else torch.zeros(8, 4) for i in range(n)]
    params = [p.requires_grad_(True) for p in params]
    plan = plan_sample([{"params": params}], torch.device("cpu"), 1)
    kinds = {params[p.index].shape for p in plan.pieces}
    assert kinds == {(4, 8), (8, 4)}


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "gaps"])
def test_a_non_contiguous_parameter_is_sampled_at_its_logical_coordinates(layout: str) -> None:
    """The sample reads logical (row-major) flat indices whatever the memory layout: the same
    values as from a contiguous copy, for the parameter and its gradient alike (a large
    tensor, so that it is strided over, not read whole)."""
    torch.manual_seed(0)
    base = torch.randn(64, 32, 3, 3)
    if layout == "channels_last":
        odd = base.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        base = base.reshape(64 * 3, 96)
        odd = base.t().contiguous().t()
    else:
        wide = torch.randn(64, 64, 3, 3)
        odd, base = wide[:, ::2], wide[:, ::2].contiguous()
    assert not odd.is_contiguous() and torch.equal(odd, base)
    sampled = []
    for t in (base, odd):
        p = torch.nn.Parameter(t)  # (a view: a copy of a tensor with gaps would be dense)
        assert p.is_contiguous() == (t is base)
        p.grad = 2 * t + 1
        plan = plan_sample([{"params": [p]}], torch.device("cpu"), 1)
        assert plan.size < p.numel()
        sampled.append(gather_sample(plan, [{"params": [p]}], torch.device("cpu")))
    assert not sampled[1][0].isnan().any()
    assert torch.equal(sampled[0][0], sampled[1][0]) and torch.equal(sampled[0][1], sampled[1][1])


def test_the_cached_views_are_left_where_a_tensor_changed_layout_in_place() -> None:
    """The per-step fast path of the sample (cached parameter views, a view per gradient)
    checks each tensor's layout, not only its storage: a gradient that arrives transposed and
    a parameter re-strided over its own storage (the same data pointer) are read at their
    logical coordinates, as a gather without the cache reads them."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    params = [torch.nn.Parameter(torch.randn(96, 64)) for _ in range(3)]
    groups = [{"params": params}]
    plan = plan_sample(groups, cpu, 1)
    views = [None] * len(plan.pieces)

    def check() -> None:
        fresh = gather_sample(plan, groups, cpu)
        for grad_mode in (False, True):  # (the fast path runs under no_grad only)
            with torch.set_grad_enabled(grad_mode):
                cached = gather_sample(plan, groups, cpu, None, views)
            assert torch.equal(cached[0], fresh[0]) and torch.equal(cached[1], fresh[1])

    for p in params:
        p.grad = torch.randn_like(p)
    check()  # (the views are made)
    check()  # (and used)
    params[0].grad = params[0].grad.t().contiguous().t()  # same values, transposed strides
    params[1].data = params[1].data.t()  # same storage, read in another order
    params[1].grad = torch.randn(params[1].shape)  # (a dense one)
    assert params[1].data_ptr() == views[1].pointer and not params[1].is_contiguous()
    check()


def test_a_state_saved_with_one_scale_for_all_groups_loads_with_it_in_each() -> None:
    """Before scales were per group the state held one ``d``; it loads, every group starts
    from it, and the sample restarts (as when the layout changes)."""
    model = small_model()
    groups = [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]
    opt = EmoSens(groups, **DISTANCE)
    train_scripted(model, opt, range(8))
    saved = copy.deepcopy(opt.state_dict())
    entry = saved["param_groups"][0]["emo_state"]["emo_distance"]
    old_d = entry["d"].max().clone()
    entry.update(d=old_d, num=entry["num"].sum())
    del entry["lr"]
    fresh_model = small_model()
    fresh_groups = [
        {"params": list(fresh_model.parameters())[:2]},
        {"params": list(fresh_model.parameters())[2:]},
    ]
    fresh = EmoSens(fresh_groups, **DISTANCE)
    fresh.load_state_dict(saved)
    train_scripted(fresh_model, fresh, range(8, 9))
    d = fresh.emo_state["emo_distance"]["d"]
    assert d.shape == (2,) and torch.all(d >= old_d)


def test_progress_against_the_gradient_counts_only_once_the_scale_has_grown() -> None:
    """``num`` takes a step's ``Σ w·g·(x0 − x)`` when it is positive or ``d`` has left D0:
    before the first growth a negative one is noise and would only delay it."""
    params = [torch.zeros(8, requires_grad=True)]
    plan = plan_sample([{"params": params}], torch.device("cpu"), 1)
    state = init_distance_state(plan.size, 1, torch.device("cpu"), torch.float64, False)
    state["started"] = torch.tensor(True)  # x0 = 0, so (x0 - x)·g = -x·g
    sensor = {k: torch.tensor(v, dtype=torch.float64) for k, v in SENSOR.items()}
    x, g = torch.ones(plan.size), torch.ones(plan.size)  # moved along the gradient: P < 0
    loss, valid = torch.tensor(1.0, dtype=torch.float64), torch.tensor(True)
    options = {"min_lr": 1e-8, "max_lr": 1.0, "direction_power": 0.0}
    out, _ = distance_update(state, x, g, plan, sensor, loss, valid, **options)
    assert out["num"].item() == 0.0
    state["d"] = torch.full((1,), 2 * D0, dtype=torch.float64)
    out, _ = distance_update(state, x, g, plan, sensor, loss, valid, **options)
    assert out["num"].item() < 0
    out, _ = distance_update(state, -x, g, plan, sensor, loss, valid, **options)
    assert out["num"].item() > 0


def _fit(name: str, maximize: bool, steps: int = 80, **kw) -> tuple[list[float], torch.Tensor]:
    """A linear fit at distance 1 (the ``_regression`` problem), minimising the squared
    error or maximising its negative with ``maximize=True``."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(8, 4, requires_grad=True)
    true_w = torch.sign(torch.randn(8, 4, generator=gen))
    opt = OPTIMIZERS[name]([w], maximize=maximize, **{**DISTANCE, **kw})
    lrs = []
    for _ in range(steps):
        x = torch.randn(32, 4, generator=gen)
        error = ((x @ w.T - x @ true_w.T) ** 2).mean()
        objective = -error if maximize else error
        w.grad = None
        objective.backward()
        opt.step(loss=objective.detach())
        lrs.append(opt.get_effective_lr()[0])
    return lrs, w.detach()


@pytest.mark.parametrize("name", NAMES)
def test_maximize_finds_the_same_scale_as_minimising_the_negative(name: str) -> None:
    """``maximize=True`` ascends ``J``: the distance is measured along the step's direction
    ``-∇(-J)``, so the run equals minimising ``-J`` bitwise (measured along ``∇J`` instead,
    progress read as negative and the LR stayed at D0)."""
    minimised, w_min = _fit(name, maximize=False)
    maximised, w_max = _fit(name, maximize=True)
    assert max(minimised) > 1e3 * D0
    assert maximised == minimised
    assert torch.equal(w_max, w_min)


def _gradual_unfreezing(name: str, steps: int, frozen_for: int, **kw):
    """Two groups; the first is frozen (``requires_grad=False``) for ``frozen_for`` steps,
    as in gradual unfreezing. Returns (model, optimizer) after ``steps`` steps."""
    model = small_model()
    body, head = model["lin"], model["out"]
    for p in body.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(body.parameters())}, {"params": list(head.parameters())}]
    opt = OPTIMIZERS[name](groups, **{**DISTANCE, **kw})
    gen = torch.Generator().manual_seed(3)
    for step in range(steps):
        if step == frozen_for:
            for p in body.parameters():
                p.requires_grad_(True)
        for p in body.parameters() if step >= frozen_for else ():
            p.grad = torch.full(p.shape, 0.1)  # a consistent pull
        for p in head.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step(loss=1.0 / (step + 1))
    return model, opt


@pytest.mark.parametrize("name", NAMES)
def test_a_group_unfrozen_late_finds_its_scale(name: str) -> None:
    """Only trainable tensors are sampled; a tensor unfrozen later joins the sample (the
    plan was kept from the first step, so an unfrozen group stayed at D0 for good)."""
    _, never = _gradual_unfreezing(name, steps=60, frozen_for=0)
    _, late = _gradual_unfreezing(name, steps=80, frozen_for=20)
    assert late.get_effective_lr()[0] > 1e3 * D0
    assert late.get_effective_lr()[0] == pytest.approx(never.get_effective_lr()[0], rel=0.5)


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_unfreezing_is_bitwise_exact(name: str) -> None:
    model, opt = _gradual_unfreezing(name, steps=30, frozen_for=10)
    saved = copy.deepcopy(opt.state_dict())
    fresh_model = copy.deepcopy(model)
    body, head = fresh_model["lin"], fresh_model["out"]
    groups = [{"params": list(body.parameters())}, {"params": list(head.parameters())}]
    fresh = OPTIMIZERS[name](groups, **DISTANCE)
    fresh.load_state_dict(saved)
    for run, optimizer in ((model, opt), (fresh_model, fresh)):
        gen = torch.Generator().manual_seed(9)
        for step in range(10):
            for p in run.parameters():
                p.grad = torch.randn(p.shape, generator=gen) if p.requires_grad else None
            optimizer.step(loss=0.5 / (step + 1))
    assert_same(fresh_model.state_dict(), model.state_dict())
    assert_same(fresh.emo_state["emo_distance"], opt.emo_state["emo_distance"])


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_saved_right_after_add_param_group_resumes_bitwise(name: str) -> None:
    """A layer unfrozen as a new group and checkpointed before the next step: the state
    carried one group's scale, so it loaded into no optimizer, not even its own ("emo_distance
    ['d'] has shape (1,) but expected (2,)")."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)
    opt = OPTIMIZERS[name](body.parameters(), **DISTANCE)
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        for p in body.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step(loss=1.0 / (step + 1))
    opt.add_param_group({"params": list(head.parameters())})
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh_body, fresh_head = copy.deepcopy(body), copy.deepcopy(head)
    groups = [{"params": list(fresh_body.parameters())}, {"params": list(fresh_head.parameters())}]
    fresh = OPTIMIZERS[name](groups, **DISTANCE)
    fresh.load_state_dict(saved)
    opt.load_state_dict(copy.deepcopy(saved))  # and into the optimizer that saved it
    for modules, optimizer in (((body, head), opt), ((fresh_body, fresh_head), fresh)):
        gen = torch.Generator().manual_seed(9)
        for step in range(6):
            for module in modules:
                for p in module.parameters():
                    p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step(loss=0.5 / (step + 1))
    assert_same(fresh_body.state_dict(), body.state_dict())
    assert_same(fresh_head.state_dict(), head.state_dict())
    assert_same(fresh.emo_state["emo_distance"], opt.emo_state["emo_distance"])


AVERAGED = {**DISTANCE, "average": True}


def _noop(emo: dict) -> None:
    pass


PLAIN = {**DISTANCE, "average": False}  # (the pulse alone differs from v37's)

# case: (options it was saved with, edit of its emo_state, options loading it, message)
MISMATCHES = {
    "v37 into distance": ({"pulse": "v37"}, _noop, PLAIN, r"saved with pulse='v37'"),
    "distance into v37": (PLAIN, _noop, {"pulse": "v37"}, r"saved with pulse='distance'"),
    "v37 into the default": (
        {"pulse": "v37"},
        _noop,
        {},
        r"saved without averaging \(pulse='v37'.*construct EmoSens\(\.\.\., pulse='v37'\)",
    ),
    "no controller entry": (
        DISTANCE,
        lambda emo: emo.pop("emo_distance"),
        DISTANCE,
        r"no 'emo_distance' entry",
    ),
    "no averaging entry": (
        AVERAGED,
        lambda emo: emo.pop("emo_average"),
        AVERAGED,
        r"no 'emo_average' entry",
    ),
    "no x0": (
        DISTANCE,
        lambda emo: emo["emo_distance"].pop("x0"),
        DISTANCE,
        r"'emo_distance' lacks 'x0'",
    ),
    "scale 0": (
        DISTANCE,
        lambda emo: emo["emo_distance"]["d"].zero_(),
        DISTANCE,
        r"emo_distance\['d'\] holds 0..0, expected values > 0",
    ),
    "negative weight": (
        AVERAGED,
        lambda emo: emo["emo_average"]["weight_sum"].neg_(),
        AVERAGED,
        r"emo_average\['weight_sum'\] holds -.*expected values >= 0",
    ),
    "fractional count": (
        AVERAGED,
        lambda emo: emo["emo_average"]["steps"].add_(0.5),
        AVERAGED,
        r"emo_average\['steps'\] holds a fractional count",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_state_of_another_pulse_or_missing_its_controller_is_refused(case: str) -> None:
    """A resume must continue the controller that was saved: a state of the other pulse,
    one whose controller entry was dropped, or impossible controller values are named in
    the error, and the optimizer is left as it was (they had loaded, restarting from D0)."""
    saved_with, edit, load_with, message = MISMATCHES[case]
    source = small_model()
    saver = EmoSens(source.parameters(), **saved_with)
    train_scripted(source, saver, range(5))
    saved = copy.deepcopy(saver.state_dict())
    edit(saved["param_groups"][0]["emo_state"])
    model = small_model()
    opt = EmoSens(model.parameters(), **load_with)
    train_scripted(model, opt, range(3))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"Invalid state_dict: .*{message}"):
        opt.load_state_dict(saved)
    assert_same(opt.state_dict(), before)


def test_a_state_saved_before_the_first_loss_loads_into_either_pulse() -> None:
    """No loss sensed, no controller state yet: nothing to continue, so either pulse loads it."""
    unstepped = EmoSens(small_model().parameters(), pulse="v37").state_dict()
    EmoSens(small_model().parameters(), **DISTANCE).load_state_dict(copy.deepcopy(unstepped))
