"""The public contract (SPEC §1, §3, §5, §6): errors, loss intake, groups, resume, safety."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from emo_core import EmoAiry, EmoCats, EmoSens, get_optimizer
from tests.core.cases import (
    NAMES,
    OPTIMIZERS,
    assert_same,
    assert_step_is_skipped,
    scripted_losses,
    set_random_grads,
    small_model,
)

# --------------------------------------------------------------------------- errors
BAD_ARGS = [
    (EmoSens, {"lr": 0.0}, r"Invalid lr: 0.0 \(expected finite 0.0 < lr\)"),
    (EmoSens, {"lr": -1}, r"Invalid lr"),
    (
        EmoSens,
        {"betas": (1.0, 0.9)},
        r"Invalid betas\[0\]: 1.0 \(expected finite 0.0 <= betas\[0\] < 1.0\)",
    ),
    (EmoSens, {"betas": (0.9, -0.1)}, r"Invalid betas\[1\]"),
    (EmoSens, {"betas": 0.9}, r"Invalid betas: 0.9 \(expected a pair"),
    (EmoSens, {"eps": 0.0}, r"Invalid eps: 0.0 \(expected finite 0.0 < eps\)"),
    (
        EmoSens,
        {"weight_decay": -0.1},
        r"Invalid weight_decay: -0.1 \(expected finite 0.0 <= weight_decay\)",
    ),
    (EmoSens, {"min_lr": 0.0}, r"Invalid min_lr"),
    (EmoSens, {"min_lr": 1e-2, "max_lr": 1e-3}, r"Invalid min_lr/max_lr.*0 < min_lr <= max_lr"),
    (EmoSens, {"log_every": 0}, r"Invalid log_every: 0 \(expected log_every >= 1\)"),
    (EmoSens, {"log_every": 1.5}, r"Invalid log_every: 1.5 \(expected an integer\)"),
    (EmoSens, {"writer": object()}, r"Invalid writer.*add_scalar"),
    (EmoSens, {"state_dtype": torch.int8}, r"Invalid state_dtype"),
    (EmoSens, {"use_shadow": "yes"}, r"Invalid use_shadow: 'yes' is not a Python literal"),
    (EmoSens, {"sync_loss": 1}, r"Invalid sync_loss: 1 \(expected True or False\)"),
    (EmoSens, {"lr": "fast"}, r"Invalid lr: 'fast' is not a Python literal"),
    (EmoSens, {"foreach": True, "fused": True}, r"Invalid foreach/fused"),
    (EmoSens, {"fused": True, "compile_update": True}, r"Invalid fused/compile_update"),
    (EmoCats, {"compile_update": None}, r"Invalid compile_update: None \(expected True or False\)"),
    (EmoCats, {"betas": (0.9, 1.0)}, r"Invalid betas\[1\]"),
    (EmoAiry, {"beta2": 1.0}, r"Invalid beta2: 1.0 \(expected finite 0.0 <= beta2 < 1.0\)"),
    (EmoAiry, {"clip_threshold": 0}, r"Invalid clip_threshold"),
    (EmoAiry, {"eps": -1e-8}, r"Invalid eps"),
]


@pytest.mark.parametrize(("cls", "kwargs", "pattern"), BAD_ARGS)
def test_bad_hyperparameters_raise_a_clear_error(cls, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_group_hyperparameters_are_checked_and_change_nothing() -> None:
    opt = EmoSens([torch.zeros(2, requires_grad=True)])
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=r"Invalid lr: -1"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": -1})
    with pytest.raises(ValueError, match=r"Invalid betas\[0\]"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "betas": (2, 0)})
    assert len(opt.param_groups) == len(before)


def test_string_arguments_are_parsed_not_truth_tested() -> None:
    opt = EmoSens(
        [torch.zeros(2, requires_grad=True)],
        lr="1.0",
        betas="(0.8, 0.99)",
        weight_decay="0.0",
        use_shadow="False",
    )
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.99)
    assert group["use_shadow"] is False
    assert group["weight_decay"] == 0.0


def test_state_dtype_accepts_dtype_names() -> None:
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    opt = EmoSens([p], state_dtype="bfloat16")
    p.grad = torch.ones_like(p)
    opt.step(loss=1.0)
    # (bf16 parameters are not averaged by default: exp_avg, not x)
    assert {key: t.dtype for key, t in opt.state[p].items()} == dict.fromkeys(
        ("exp_avg", "exp_avg_sq"), torch.bfloat16
    )
    assert EmoSens([p], state_dtype="torch.float32").state_dtype == torch.float32
    with pytest.raises(ValueError, match=r"Invalid state_dtype: torch.int8"):
        EmoSens([p], state_dtype="int8")


def test_registry() -> None:
    assert get_optimizer("EmoSens") is EmoSens
    assert get_optimizer("emoairy") is EmoAiry
    with pytest.raises(ValueError, match="emoairy, emocats, emosens"):
        get_optimizer("adam")


# ---------------------------------------------------------------- loss intake
@pytest.mark.parametrize(
    ("loss", "error", "pattern"),
    [
        (torch.ones(3), ValueError, r"step\(loss=...\).*scalar.*shape \(3,\)"),
        ("0.5", TypeError, r"step\(loss=...\).*got str"),
        (torch.tensor(1 + 1j), TypeError, r"complex"),
    ],
)
def test_bad_loss_raises_and_modifies_nothing(loss, error, pattern: str) -> None:
    model = small_model()
    opt = EmoSens(model.parameters())
    set_random_grads(list(model.parameters()), 0)
    opt.step(loss=1.0)
    set_random_grads(list(model.parameters()), 1)
    params_before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=pattern):
        opt.step(loss=loss)
    assert_same(model.state_dict(), params_before)
    assert_same(opt.state_dict(), state_before)


def test_closure_returning_none_warns_once_and_keeps_the_lr() -> None:
    """As the README says of a missing loss: warn once, keep the LR, still apply the grads."""
    p = torch.zeros(2, requires_grad=True)
    opt = EmoSens([p])
    p.grad = torch.ones(2)
    opt.step(loss=1.0)
    lr = opt.get_effective_lr()
    moved = p.detach().clone()
    p.grad = torch.ones(2)
    with pytest.warns(UserWarning, match="received no loss"):
        assert opt.step(lambda: None) is None
    assert opt.get_effective_lr() == lr
    assert opt.telemetry()["sensed_steps"] == 1
    assert not torch.equal(p.detach(), moved)  # the gradients were applied
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: None)  # once
    p.grad = None
    assert opt.step(lambda: None) is None  # a skipped batch: nothing to sense or apply
    assert opt.telemetry()["sensed_steps"] == 1
    with pytest.raises(TypeError, match=r"closure\(\).*got dict"):
        opt.step(lambda: {"loss": 1.0})
    with pytest.raises(ValueError, match=r"set_loss\(\)"):
        opt.set_loss(torch.ones(2))


def test_closure_runs_once_under_grad_and_its_value_is_returned() -> None:
    w = torch.ones(3, requires_grad=True)
    opt = EmoSens([w])
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    out = opt.step(closure)
    assert calls == [True]
    assert out.requires_grad and float(out.detach()) == 3.0
    assert opt.telemetry()["ema_long"] == pytest.approx(3.0)


def test_loss_priority_explicit_then_pending_then_closure() -> None:
    p = torch.zeros(1, requires_grad=True)

    def sensed(**step_kwargs) -> float:
        opt = EmoSens([p])
        p.grad = torch.zeros(1)
        if "pending" in step_kwargs:
            opt.set_loss(step_kwargs.pop("pending"))
        opt.step(**step_kwargs)
        return opt.telemetry()["ema_long"]

    assert sensed(closure=lambda: torch.tensor(3.0), pending=2.0, loss=1.0) == pytest.approx(1.0)
    assert sensed(closure=lambda: torch.tensor(3.0), pending=2.0) == pytest.approx(2.0)
    assert sensed(closure=lambda: torch.tensor(3.0)) == pytest.approx(3.0)


def test_add_loss_feeds_the_mean_and_pending_is_cleared() -> None:
    p = torch.zeros(1, requires_grad=True)
    opt = EmoSens([p])
    for value in (1.0, torch.tensor(2.0), torch.tensor([6.0])):
        opt.add_loss(value)
    p.grad = torch.zeros(1)
    opt.step()
    assert opt.telemetry()["ema_long"] == pytest.approx(3.0)
    p.grad = torch.zeros(1)
    with pytest.warns(UserWarning, match="received no loss"):
        opt.step()  # the pending value was used up
    assert opt.telemetry()["sensed_steps"] == 1


def test_no_loss_warns_once_and_keeps_the_previous_lr() -> None:
    p = torch.zeros(2, requires_grad=True)
    opt = EmoSens([p])
    p.grad = torch.ones(2)
    with pytest.warns(UserWarning, match="set_loss"):
        opt.step()
    # the distance controller's starting scale D0 before the first loss (v3.7: its max_lr)
    assert opt.get_effective_lr() == [pytest.approx(1e-6)]
    assert not torch.equal(p, torch.zeros(2))  # it still trains
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_pending_loss_reaches_the_optimizer_through_a_dict_copying_wrapper() -> None:
    """Lightning's LightningOptimizer copies the optimizer's __dict__ and forwards calls."""

    class Wrapper:
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k != "step"}
            self.__class__ = type("Wrapped", (Wrapper, type(optimizer)), {})
            self._optimizer = optimizer

        def step(self, closure=None, **kwargs):
            return self._optimizer.step(closure, **kwargs)

    p = torch.zeros(2, requires_grad=True)
    opt = EmoSens([p])
    wrapped = Wrapper(opt)
    wrapped.set_loss(2.0)
    p.grad = torch.ones(2)
    wrapped.step()
    assert opt.telemetry()["ema_long"] == pytest.approx(2.0)


def test_loss_that_requires_grad_is_detached_and_not_kept_alive() -> None:
    w = torch.ones(3, requires_grad=True)
    opt = EmoSens([w])
    loss = (w * 2).sum()
    loss.backward(retain_graph=True)
    opt.set_loss(loss)
    pending = opt._pending["sum"]
    assert not pending.requires_grad and pending.grad_fn is None
    assert pending.data_ptr() != loss.data_ptr()
    opt.step()
    for value in opt.state_dict()["param_groups"][0]["emo_state"]["emo_pulse"].values():
        assert not value.requires_grad


# --------------------------------------------------------------- groups, LR
def test_group_lr_is_a_multiplier_zero_freezes_and_is_never_written() -> None:
    a, b, c = (torch.ones(3, requires_grad=True) for _ in range(3))
    opt = EmoSens([{"params": [a]}, {"params": [b], "lr": 0.5}, {"params": [c], "lr": 0.0}])
    for step, loss in enumerate(scripted_losses(5)):
        set_random_grads([a, b, c], step)
        opt.step(loss=loss)
    lr_a, lr_b, lr_c = opt.get_effective_lr()
    assert lr_b == pytest.approx(lr_a / 2)
    assert lr_c == 0.0
    assert torch.equal(c, torch.ones(3))
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5, 0.0]


def test_lambda_lr_halving_halves_the_effective_lr() -> None:
    p = torch.zeros(2, requires_grad=True)
    opt = EmoSens([p])
    twin = EmoSens([torch.zeros(2, requires_grad=True)])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for step, loss in enumerate(scripted_losses(4)):
        for q in (p, twin.param_groups[0]["params"][0]):
            q.grad = torch.zeros(2)
        opt.step(loss=loss)
        twin.step(loss=loss)
        assert opt.get_effective_lr()[0] == pytest.approx(twin.get_effective_lr()[0] * 0.5**step)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5**4)


@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_and_empty_groups_are_left_alone(name: str) -> None:
    used, unused = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = OPTIMIZERS[name]([{"params": [used, unused]}, {"params": []}])
    used.grad = torch.ones(3)
    opt.step(loss=1.0)
    assert torch.equal(unused, torch.ones(3)) and not opt.state[unused]
    assert not torch.equal(used, torch.ones(3))


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_rejected_and_change_nothing(name: str) -> None:
    dense = torch.ones(2, requires_grad=True)
    emb = nn.Embedding(4, 2, sparse=True)
    opt = OPTIMIZERS[name]([{"params": [dense]}, {"params": list(emb.parameters())}])
    dense.grad = torch.ones(2)
    emb(torch.tensor([1])).sum().backward()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(
        RuntimeError, match=r"sparse gradients \(param group 1, parameter index 0\)"
    ):
        opt.step(loss=1.0)
    assert torch.equal(dense, torch.ones(2))
    assert_same(opt.state_dict(), before)


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_update_as_pairs_of_reals(name: str) -> None:
    z = torch.zeros(4, 2, dtype=torch.complex64, requires_grad=True)
    pair = torch.zeros(4, 2, 2, requires_grad=True)
    opt_z, opt_r = OPTIMIZERS[name]([z]), OPTIMIZERS[name]([pair])
    for step, loss in enumerate(scripted_losses(5)):
        set_random_grads([pair], step)
        z.grad = torch.view_as_complex(pair.grad.clone())
        opt_z.step(loss=loss)
        opt_r.step(loss=loss)
    torch.testing.assert_close(torch.view_as_real(z.detach()), pair.detach())


# ------------------------------------------------------------------- safety
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "impl",
    [{}, {"foreach": True}, {"foreach": False}, {"compile_update": True}],
    ids=["auto", "foreach", "loop", "compiled"],
)
@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "nan_grad", "inf_grad"])
def test_non_finite_step_changes_nothing_and_training_continues(
    name: str, impl: dict, bad: str
) -> None:
    model = small_model()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params, use_shadow=True, **impl)
    for step, loss in enumerate(scripted_losses(3)):
        set_random_grads(params, step)
        opt.step(loss=loss)
    set_random_grads(params, 3)
    loss = {"nan_loss": float("nan"), "inf_loss": float("inf")}.get(bad, 0.5)
    if bad.endswith("grad"):
        params[1].grad[0] = float(bad[:3])
    assert_step_is_skipped(model, opt, loss)
    params_before = copy.deepcopy(model.state_dict())  # (as before the skipped step)
    set_random_grads(params, 4)
    opt.step(loss=0.4)
    assert opt.telemetry()["sensed_steps"] == 4
    assert all(torch.isfinite(p).all() for p in params)
    assert not all(torch.equal(p, params_before[k]) for k, p in model.state_dict().items())


@pytest.mark.parametrize("size", [(8, 16), (512, 256)], ids=["small-amp-check", "large-norm-check"])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_the_finite_check_flags_every_bad_value_and_leaves_gradients_bitwise(
    size: tuple[int, int], bad: float | None
) -> None:
    """Both checks (the AMP kernel for small CPU gradients, 2-norms for large ones), under the
    plain update and under the default averaged one. The averaged fused kernel uses each
    gradient as its own first-moment buffer (``lerp(g, g, 1)``): the values stay, but on CPU
    a ``-0.0`` comes back as ``+0.0``; every other bit pattern is kept."""
    for averaged in (False, True):
        params = [torch.randn(size, requires_grad=True) for _ in range(3)]
        opt = EmoSens(params, average=averaged)
        set_random_grads(params, 0)
        params[2].grad[1, 2] = -0.0
        params[2].grad[0, 0] = 1e-45  # a subnormal
        if bad is not None:
            params[1].grad[3, 4] = bad
        grads = [p.grad.clone() for p in params]
        opt.step(loss=1.0)
        for g, before in zip((p.grad for p in params), grads):
            bits, bits_before = g.view(torch.int32), before.view(torch.int32)
            if averaged:  # the sign of a zero aside
                assert torch.equal(g, before) or torch.isnan(before).any()
                bits, bits_before = bits[before != 0], bits_before[before != 0]
            assert torch.equal(bits, bits_before)
        assert int(opt.emo_state["emo_pulse"]["skipped"]) == (bad is not None)


# ------------------------------------------------------------------- resume
def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    params = list(model.parameters())
    losses = scripted_losses(steps.stop)
    for step in steps:
        set_random_grads(params, step)
        opt.step(loss=losses[step])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("round_trip", [False, True], ids=["in_memory", "torch_save"])
def test_exact_resume(name: str, round_trip: bool) -> None:
    ref_model = small_model()
    ref_opt = OPTIMIZERS[name](ref_model.parameters(), use_shadow=True)
    _train(ref_model, ref_opt, range(40))

    model = small_model()
    opt = OPTIMIZERS[name](model.parameters(), use_shadow=True)
    _train(model, opt, range(20))
    model_sd, opt_sd = model.state_dict(), opt.state_dict()
    if round_trip:
        buffer = io.BytesIO()
        torch.save({"model": model_sd, "opt": opt_sd}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        model_sd, opt_sd = loaded["model"], loaded["opt"]
    fresh_model = small_model(seed=123)
    fresh_model.load_state_dict(model_sd)
    fresh_opt = OPTIMIZERS[name](fresh_model.parameters(), use_shadow=True)
    fresh_opt.load_state_dict(opt_sd)
    _train(fresh_model, fresh_opt, range(20, 40))
    assert_same(fresh_model.state_dict(), ref_model.state_dict())
    assert fresh_opt.telemetry() == ref_opt.telemetry()


def test_should_stop_survives_resume() -> None:
    p = torch.zeros(2, requires_grad=True)
    opt = EmoSens([p])
    for _ in range(100):
        p.grad = torch.zeros(2)
        opt.step(loss=1.0)
    assert opt.should_stop
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = EmoSens([torch.zeros(2, requires_grad=True)])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.should_stop


def test_state_dict_is_deterministic() -> None:
    def run() -> dict:
        model = small_model()
        opt = EmoSens(model.parameters())
        _train(model, opt, range(5))
        sd = opt.state_dict()
        return sd

    assert_same(run(), run())


def test_writer_receives_the_documented_tags_every_log_every_steps() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.calls.append((tag, value, step))

    writer = Recorder()
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = EmoSens([{"params": [a]}, {"params": [b], "lr": 0.5}], writer=writer, log_every=2)
    for step in range(4):
        a.grad, b.grad = torch.ones(2), torch.ones(2)
        opt.step(loss=1.0 / (step + 1))
    tags = {tag for tag, _, _ in writer.calls}
    assert {"emo/lr", "emo/lr_group1", "emo/scalar", "emo/trust", "emo/noise"} <= tags
    assert sorted({step for _, _, step in writer.calls}) == [2, 4]
    assert all(isinstance(value, float) for _, value, _ in writer.calls)


@pytest.mark.parametrize("empty", [0, 1])
def test_logged_lr_is_that_of_groups_with_parameters(empty: int) -> None:
    # transformers' Trainer makes a decay and a no-decay group, one of them empty for a LoRA
    # or a norms-only fine-tune; under pulse="distance" the empty one stays at its start
    # scale (1e-6), and as group 0 it was logged as the run's learning rate.
    from emo_core import log_metrics

    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    groups = [{"params": []}, {"params": list(model.parameters())}]
    opt = EmoSens(groups[::-1] if empty else groups, pulse="distance")
    for _ in range(30):
        x = torch.randn(16, 8)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    trained = opt.get_effective_lr()[1 - empty]
    assert trained > 1e-5  # (warmed up, the empty group did not)
    metrics = log_metrics(opt)
    assert metrics["emo/lr"] == trained
    assert not any(key.startswith("emo/lr_group") for key in metrics)


def test_tensorboard_summary_writer(tmp_path) -> None:
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    writer = tensorboard.SummaryWriter(log_dir=str(tmp_path))
    p = torch.zeros(2, requires_grad=True)
    opt = EmoCats([p], writer=writer)
    for _ in range(3):
        p.grad = torch.ones(2)
        opt.step(loss=1.0)
    writer.close()
    assert any(f.name.startswith("events.out.tfevents") for f in tmp_path.iterdir())
