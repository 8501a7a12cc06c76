"""``capture_loss=True``: the optimizer senses scalar backward() calls (emo_core.capture).

What an optimizer sensed is read through its sensor: a reference optimizer fed the expected
per-step losses explicitly must end with the same EMAs, scalar, trust, noise and pulse.
"""

from __future__ import annotations

import copy
import gc
import io
import threading
import warnings
import weakref
from collections.abc import Iterator
from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from emo_core import EmoAiry, EmoCats, EmoSens, capture
from tests.core.cases import OPTIMIZERS, assert_sensed_as_fed
from tests.core.test_no_sync import count_host_reads

ORIGINAL_BACKWARD = torch.autograd.backward
ORIGINAL_SCALE = torch.amp.GradScaler.scale


@pytest.fixture(autouse=True)
def _nothing_left_installed() -> Iterator[None]:
    yield
    if capture.capture_installed():
        gc.collect()  # (slow with torch loaded: only when something is left)
    assert not capture.capture_installed(), "a test left a capturing optimizer alive"
    assert torch.autograd.backward is ORIGINAL_BACKWARD
    assert torch.amp.GradScaler.scale is ORIGINAL_SCALE


assert_sensed = partial(assert_sensed_as_fed, rtol=1e-6, atol=1e-12)


def regression(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    batches = []
    for _ in range(12):
        x = torch.randn(4, 4)
        batches.append((x, x.sum(1, keepdim=True)))
    return model, batches


# --------------------------------------------------------------- install, remove
@pytest.mark.parametrize("value", [True, "True"])
def test_capture_is_installed_once_and_removed_with_the_last_optimizer(value) -> None:
    model = nn.Linear(2, 1)
    assert not capture.capture_installed()
    first = EmoSens(model.parameters(), capture_loss=value)
    wrapper = torch.autograd.backward
    second = EmoCats(model.parameters(), capture_loss=True)
    assert wrapper is not ORIGINAL_BACKWARD and torch.autograd.backward is wrapper  # once
    assert wrapper.__wrapped__ is ORIGINAL_BACKWARD
    first.close()
    first.close()  # idempotent
    assert capture.capture_installed() and not capture.is_capturing(first)
    probe = weakref.ref(second)
    del second
    gc.collect()
    assert probe() is None
    assert not capture.capture_installed()  # removed when the last one was collected
    assert torch.autograd.backward is ORIGINAL_BACKWARD


def test_off_by_default_and_strings_parsed() -> None:
    model = nn.Linear(2, 1)
    EmoAiry(model.parameters())
    EmoSens(model.parameters(), capture_loss="False")
    assert not capture.capture_installed()
    with pytest.raises(ValueError, match="Invalid capture_loss"):
        EmoSens(model.parameters(), capture_loss="yes")
    with pytest.raises(ValueError, match="Invalid lr"):
        EmoSens(model.parameters(), lr=-1.0, capture_loss=True)
    assert not capture.capture_installed()  # a failed constructor installs nothing


def test_a_wrapper_someone_wrapped_stays_inert() -> None:
    model = nn.Linear(2, 1)
    opt = EmoSens(model.parameters(), capture_loss=True)
    ours = torch.autograd.backward
    calls = []

    def theirs(*args, **kwargs):
        calls.append(1)
        return ours(*args, **kwargs)

    torch.autograd.backward = theirs
    try:
        opt.close()
        assert torch.autograd.backward is theirs  # not unwrapped from under them
        again = EmoSens(model.parameters(), capture_loss=True)
        (model(torch.ones(1, 2)).sum() * 0 + 2.0).backward()
        again.step()
        assert calls and again.telemetry()["ema_short"] == 2.0  # the first loss, once
        again.close()
    finally:
        torch.autograd.backward = ORIGINAL_BACKWARD


def test_a_re_installed_capture_counts_each_backward_once() -> None:
    model = nn.Linear(2, 1)
    opt = EmoSens(model.parameters(), capture_loss=True)
    ours = torch.autograd.backward
    torch.autograd.backward = lambda *a, **k: ours(*a, **k)  # someone wraps ours
    try:
        opt.close()
        again = EmoSens(model.parameters(), capture_loss=True)  # wraps theirs
        loss = (model.weight.sum() * 0 + 2.5) * torch.ones(())
        loss.backward()
        assert float(capture.take(again)) == 2.5  # not 5.0: the old wrapper is inert
        again.close()
    finally:
        torch.autograd.backward = ORIGINAL_BACKWARD


# ------------------------------------------------------------- what is sensed
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accumulation_senses_the_mean_micro_batch_loss(name: str) -> None:
    # The accelerate/HF/Lightning convention: each micro-batch loss divided by N before
    # backward. Sum of captured values == mean micro-batch loss == explicit add_loss feed.
    # The last window is short (N = 2), as at an epoch's end: still the mean.
    model, batches = regression()
    opt = OPTIMIZERS[name](model.parameters(), capture_loss=True)
    windows, means = [batches[0:4], batches[4:8], batches[8:10]], []
    for window in windows:
        losses = []
        for x, y in window:
            loss = nn.functional.mse_loss(model(x), y)
            (loss / len(window)).backward()
            losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
        means.append(sum(losses) / len(losses))
    assert_sensed(opt, means)
    opt.close()


def test_a_compiled_training_step_is_sensed_at_every_call() -> None:
    """torch.compile traces ``loss.backward()`` into its graph; the capture wrapper is kept
    out of the trace, so each call of the compiled step is sensed (traced, the wrapper ran
    once at tracing time and no loss was ever sensed)."""
    model, batches = regression()
    opt = EmoSens(model.parameters(), capture_loss=True)

    @torch.compile(backend="eager")
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss.detach()

    losses = []
    for x, y in batches[:5]:
        opt.zero_grad()
        losses.append(float(train_step(x, y)))
        opt.step()
    assert_sensed(opt, losses)
    opt.close()


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_a_capturing_optimizer_captures_for_itself(how: str) -> None:
    """A copy keeps every setting, capture_loss included: it captures its own backward calls
    from an empty buffer (it had reported capture_loss=True and captured nothing)."""
    model, _ = regression()
    opt = EmoSens(model.parameters(), capture_loss=True)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert capture.is_capturing(twin)
    params = twin.param_groups[0]["params"]  # (the copy's own tensors)
    twin.zero_grad()
    loss = sum((p**2).sum() for p in params)
    loss.backward()
    twin.step()
    assert_sensed(twin, [float(loss.detach())])
    twin.close()
    opt.close()


def test_several_scalars_in_one_call_and_only_losses_are_captured() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = EmoSens([w], capture_loss=True)
    torch.autograd.backward([w[0] * 3.0, w[1] * 0.5])  # 3.0 + 1.0
    (w * 2).backward(torch.ones(2))  # non-scalar, explicit gradient: not a loss
    (w.sum() * 10).backward(torch.tensor(1.0))  # explicit gradient: not captured
    assert float(capture.take(opt)) == pytest.approx(4.0)
    opt.close()


def test_reentrant_checkpoint_is_counted_once() -> None:
    model = nn.Linear(3, 1)
    opt = EmoSens(model.parameters(), capture_loss=True)
    x = torch.randn(5, 3, requires_grad=True)
    loss = checkpoint(lambda t: model(t).pow(2).mean(), x, use_reentrant=True)
    loss.backward()
    assert float(capture.take(opt)) == pytest.approx(float(loss.detach()))
    opt.close()


def test_explicit_feeding_wins_and_capture_beats_the_closure() -> None:
    model = nn.Linear(2, 1)
    opt = EmoSens(model.parameters(), capture_loss=True)
    x = torch.ones(3, 2)

    def backward_of(value: float) -> None:
        (model(x).sum() * 0 + value).backward()

    backward_of(5.0)
    opt.step(loss=2.0)  # step(loss=) wins, the capture is dropped
    backward_of(7.0)
    opt.set_loss(3.0)
    opt.step()  # set_loss wins
    backward_of(1.5)

    def closure() -> torch.Tensor:
        (model(x).sum() * 0 + 0.5).backward()
        return torch.tensor(9.0)  # what a framework's closure returns, e.g. loss / N

    opt.step(closure)  # captured 1.5 + 0.5 (outside and inside the closure)
    opt.step(lambda: torch.tensor(4.0))  # nothing captured: the closure's value
    assert_sensed(opt, [2.0, 3.0, 2.0, 4.0])
    opt.close()


def test_zero_grad_drops_the_capture_so_each_optimizer_senses_its_own_loss() -> None:
    # GAN pattern: zero_grad; backward; step, for two optimizers in turn.
    torch.manual_seed(0)
    a, b = nn.Linear(3, 1), nn.Linear(3, 1)
    opt_a = EmoSens(a.parameters(), capture_loss=True)
    opt_b = EmoCats(b.parameters(), capture_loss=True)
    seen = {"a": [], "b": []}
    for _ in range(4):
        x = torch.randn(6, 3)
        for name, net, opt in (("a", a, opt_a), ("b", b, opt_b)):
            opt.zero_grad()
            loss = net(x).pow(2).mean() + (1.0 if name == "b" else 0.0)
            loss.backward()
            opt.step()
            seen[name].append(float(loss.detach()))
    assert_sensed(opt_a, seen["a"])
    assert_sensed(opt_b, seen["b"])
    # Without zero_grad in between, an optimizer senses every loss since its last step.
    opt_a.zero_grad()
    opt_b.zero_grad()
    (a.weight.sum() * 0 + 1.0).backward()
    (b.weight.sum() * 0 + 2.0).backward()
    assert float(capture.take(opt_a)) == float(capture.take(opt_b)) == 3.0
    opt_a.close()
    opt_b.close()


def test_grad_scaler_loss_is_unscaled_and_skipped_steps_leak_nothing() -> None:
    # A real GradScaler whose scale doubles after every good step and halves on overflow:
    # a captured *scaled* loss would read as a spike each step.
    model, batches = regression()
    opt = EmoSens(model.parameters(), capture_loss=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_factor=2.0, growth_interval=1)
    n, overflow, sensed, scales = 2, {2}, [], []
    for window in range(5):
        losses = []
        for x, y in batches[window * n : (window + 1) * n]:
            loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss / n).backward()
            losses.append(float(loss.detach()))
        if window in overflow:
            model[0].weight.grad.view(-1)[0] = float("inf")
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        model.zero_grad()  # not opt.zero_grad(): the scaler's skip alone must drop the capture
        if window not in overflow:
            sensed.append(sum(losses) / n)
    assert scales == [16.0, 32.0, 64.0, 32.0, 64.0]
    assert opt.telemetry()["step"] == 4
    assert_sensed(opt, sensed)
    opt.close()


# ------------------------------------------------------------- threads, syncs
def test_concurrent_backward_and_attach_release_from_threads() -> None:
    # Capture is process-wide: backward() in any thread reaches every capturing optimizer.
    w = nn.Parameter(torch.zeros(()))
    keeper = EmoSens([w], capture_loss=True)
    threads, per_thread, errors = 4, 50, []
    barrier = threading.Barrier(threads * 2)

    def backward_loop() -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                (w * 0 + 1.0).backward()
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    def churn() -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                EmoSens([nn.Parameter(torch.zeros(1))], capture_loss=True).close()
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=backward_loop) for _ in range(threads)]
    workers += [threading.Thread(target=churn) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors
    assert float(capture.take(keeper)) == threads * per_thread
    keeper.close()
    # Now every attach installs and every close removes, racing each other.
    racers = [threading.Thread(target=churn) for _ in range(threads * 2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert not errors and not capture.capture_installed()


def test_capture_and_step_make_no_host_reads() -> None:
    model, batches = regression()
    opt = EmoSens(model.parameters(), capture_loss=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    for x, y in batches[:3]:
        loss = nn.functional.mse_loss(model(x), y)
        scaled = scaler.scale(loss)
        with count_host_reads() as counts:
            scaled.backward()
            opt.step()
            opt.zero_grad()
        assert sum(counts.values()) == 0, dict(counts)
    assert opt.telemetry()["sensed_steps"] == 3
    opt.close()


@pytest.mark.gpu
def test_cuda_capture_and_step_do_not_synchronize() -> None:
    model, batches = regression()
    model = model.cuda()
    opt = EmoSens(model.parameters(), capture_loss=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=8.0)
    for x, y in batches[:3]:
        loss = nn.functional.mse_loss(model(x.cuda()), y.cuda())
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.scale(loss / 2).backward()
            opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.telemetry()["sensed_steps"] == 3
    opt.close()


# ------------------------------------------------------------------ 1e-4 guard
def test_small_lr_warns_once_at_the_caller_with_the_effective_lr_and_the_fix() -> None:
    model = nn.Linear(2, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = EmoSens(model.parameters(), lr=1e-4)
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-5})
    assert len(caught) == 1
    warning = caught[0]
    assert warning.category is UserWarning and warning.filename == __file__
    text = str(warning.message)
    assert "multiplies the automatic learning rate" in text
    assert "1e-12..0.0001" in text  # emoPulse 1e-8..1 (the distance controller's) times 1e-4
    assert "lr=1.0" in text and "--learning_rate 1.0" in text


@pytest.mark.parametrize("optimizer", [EmoSens, EmoAiry, EmoCats])
def test_a_small_group_lr_warns_too(optimizer: type) -> None:
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    with pytest.warns(UserWarning, match=r"lr=0.0002\).*applied LR is emoPulse x 0.0002"):
        optimizer([{"params": params[:1]}, {"params": params[1:], "lr": 2e-4}])


def test_lr_near_one_a_frozen_group_or_a_tensor_lr_do_not_warn() -> None:
    params = [nn.Parameter(torch.zeros(2)) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EmoSens(
            [
                {"params": params[:1]},
                {"params": params[1:2], "lr": 0.0},
                {"params": params[2:3], "lr": 0.1},
                {"params": params[3:], "lr": torch.tensor(1e-4)},
            ],
            lr=0.5,
        )


def test_the_no_loss_warning_points_to_capture_loss() -> None:
    p = nn.Parameter(torch.zeros(2))
    opt = EmoSens([p])
    p.grad = torch.ones(2)
    with pytest.warns(UserWarning, match="received no loss.*capture_loss=True"):
        opt.step()
