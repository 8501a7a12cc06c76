"""Hardened inputs (issue 13, items 2, 3 and 6): hyperparameters, loss types, huge gradients,
closures returning None, ``maximize``."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from emo_core import EmoAiry, EmoCats, EmoSens
from tests.core.cases import (
    ALL_IMPLS,
    NAMES,
    OPTIMIZERS,
    impl_id,
    scripted_losses,
    set_random_grads,
    small_model,
)

INF, NAN = float("inf"), float("nan")

# ------------------------------------------------------------ hyperparameters
# (optimizer, constructor arguments, expected message)
BAD_ARGS = [
    (EmoSens, {"lr": INF}, r"Invalid lr: inf \(expected finite 0.0 < lr\)"),
    (EmoSens, {"lr": "1e999"}, r"Invalid lr: '1e999' \(expected finite 0.0 < lr\)"),
    (EmoSens, {"weight_decay": INF}, r"Invalid weight_decay: inf \(expected finite 0.0 <= "),
    (EmoCats, {"weight_decay": NAN}, r"Invalid weight_decay: nan"),
    (EmoSens, {"max_lr": INF}, r"Invalid max_lr: inf \(expected finite 0.0 < max_lr\)"),
    (EmoAiry, {"min_lr": INF}, r"Invalid min_lr: inf"),
    (EmoSens, {"min_lr": NAN}, r"Invalid min_lr: nan"),
    (EmoSens, {"eps": INF}, r"Invalid eps: inf \(expected finite 0.0 < eps\)"),
    (EmoAiry, {"eps": INF}, r"Invalid eps: inf"),
    (EmoAiry, {"clip_threshold": INF}, r"Invalid clip_threshold: inf"),
    (EmoSens, {"betas": (NAN, 0.9)}, r"Invalid betas\[0\]: nan \(expected finite 0.0 <= "),
    (EmoCats, {"betas": (0.9, INF)}, r"Invalid betas\[1\]: inf"),
    (EmoAiry, {"beta2": NAN}, r"Invalid beta2: nan"),
    (
        EmoSens,
        {"state_dtype": torch.float8_e4m3fn},
        r"Invalid state_dtype: torch.float8_e4m3fn \(expected None or one of torch.float32, "
        r"torch.float64, torch.bfloat16, torch.float16",
    ),
    (EmoCats, {"state_dtype": "float8_e5m2"}, r"Invalid state_dtype: torch.float8_e5m2"),
    (EmoSens, {"state_dtype": torch.complex64}, r"Invalid state_dtype: torch.complex64"),
    (EmoSens, {"maximize": 1}, r"Invalid maximize: 1 \(expected True or False\)"),
    (EmoAiry, {"maximize": "yes"}, r"Invalid maximize: 'yes'"),
    (EmoSens, {"fused": "True", "foreach": "True"}, r"Invalid foreach/fused"),
]


@pytest.mark.parametrize(("cls", "kwargs", "pattern"), BAD_ARGS)
def test_non_finite_and_unsupported_hyperparameters_raise(cls, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


# (optimizer, group entries, expected message): per-group values get the same checks
BAD_GROUPS = [
    (EmoSens, {"lr": INF}, r"Invalid lr: inf"),
    (EmoSens, {"weight_decay": INF}, r"Invalid weight_decay: inf"),
    (EmoSens, {"eps": INF}, r"Invalid eps: inf"),
    (EmoCats, {"betas": (0.9, NAN)}, r"Invalid betas\[1\]: nan"),
    (EmoAiry, {"beta2": INF}, r"Invalid beta2: inf"),
    (EmoSens, {"lr": torch.tensor(NAN)}, r"Invalid lr: tensor\(nan\) \(expected finite 0.0 <= lr"),
    (EmoSens, {"lr": torch.tensor(-1.0)}, r"Invalid lr: tensor\(-1.\)"),
    (EmoCats, {"lr": torch.tensor(INF)}, r"Invalid lr: tensor\(inf\)"),
    (EmoSens, {"lr": torch.ones(2)}, r"Invalid lr: a tensor of shape \(2,\)"),
    (
        EmoSens,
        {"lr": torch.tensor(True)},
        r"Invalid lr: a tensor of shape \(\) and dtype torch.bool",
    ),
]


@pytest.mark.parametrize(("cls", "entries", "pattern"), BAD_GROUPS)
def test_bad_group_values_raise_in_the_constructor_and_in_add_param_group(
    cls, entries: dict, pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        cls([{"params": [torch.zeros(2, requires_grad=True)], **entries}])
    opt = cls([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=pattern):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], **entries})
    assert len(opt.param_groups) == 1


def test_a_valid_tensor_group_lr_is_kept_as_a_tensor() -> None:
    lr = torch.tensor(0.5)
    opt = EmoSens([{"params": [torch.zeros(2, requires_grad=True)], "lr": lr}])
    assert opt.param_groups[0]["lr"] is lr


# String arguments as kohya-ss passes them (``--optimizer_args fused=True foreach=False``):
# parsed before the cross-checks, so "False" is False, not a truthy string.
STRING_ARGS = [
    (EmoSens, {"fused": "True", "foreach": "False"}, {"fused": True, "foreach": False}),
    (
        EmoSens,
        {"fused": "True", "compile_update": "False"},
        {"fused": True, "compile_update": False},
    ),
    (EmoSens, {"foreach": "None", "fused": "None"}, {"foreach": None, "fused": None}),
    (EmoCats, {"foreach": "False", "compile_update": "False"}, {"foreach": False}),
    (EmoAiry, {"lr": "1.0", "min_lr": "1e-7", "max_lr": "2e-3"}, {"min_lr": 1e-7, "max_lr": 2e-3}),
    (EmoSens, {"log_every": "5", "maximize": "False"}, {"log_every": 5, "maximize": False}),
    (EmoSens, {"max_lr": np.float32(2e-3), "log_every": np.int64(3)}, {"log_every": 3}),
]


@pytest.mark.parametrize(("cls", "kwargs", "expected"), STRING_ARGS)
def test_string_and_numpy_arguments_are_parsed_before_cross_checks(
    cls, kwargs: dict, expected: dict
) -> None:
    p = torch.zeros(3, requires_grad=True)
    opt = cls([p], **kwargs)
    for name, value in expected.items():
        assert getattr(opt, name) == value and type(getattr(opt, name)) is type(value)
    p.grad = torch.ones(3)
    opt.step(loss=1.0)
    assert torch.isfinite(p).all() and not torch.equal(p, torch.zeros(3))


def test_hf_weight_decay_inf_fails_at_optimizer_creation(tmp_path: Path) -> None:
    """Through transformers (``--weight_decay inf``) the run used to finish logging loss 0;
    now the Trainer (which builds the optimizer early) or create_optimizer() raises."""
    pytest.importorskip("transformers")
    from emo_hf import EmoTrainer, EmoTrainingArguments

    with pytest.raises(ValueError, match=r"Invalid weight_decay: inf \(expected finite"):
        args = EmoTrainingArguments(
            output_dir=str(tmp_path), optim="emosens", weight_decay=INF, report_to="none",
            max_steps=1, save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
        )  # fmt: skip
        trainer = EmoTrainer(model=torch.nn.Linear(2, 1), args=args, train_dataset=[])
        trainer.create_optimizer()


# ------------------------------------------------------------------ losses
NUMPY_LOSSES = [
    np.float32(0.75),
    np.float64(0.75),
    np.float16(0.75),
    np.int64(2),
    np.array(0.75),
    np.array([0.75], dtype=np.float32),
]


@pytest.mark.parametrize("loss", NUMPY_LOSSES, ids=lambda v: f"{type(v).__name__}-{v.dtype}")
@pytest.mark.parametrize("feed", ["step", "set_loss", "add_loss", "closure"])
def test_numpy_scalars_are_losses_like_python_numbers(loss, feed: str) -> None:
    def sensed(value) -> dict:
        p = torch.zeros(2, requires_grad=True)
        opt = EmoSens([p])
        p.grad = torch.ones(2)
        if feed == "step":
            opt.step(loss=value)
        elif feed == "closure":
            opt.step(lambda: value)
        else:
            getattr(opt, feed)(value)
            opt.step()
        return opt.telemetry()

    assert sensed(loss) == sensed(float(loss.item()))


@pytest.mark.parametrize(
    ("loss", "pattern"),
    [(np.ones(3), r"one-element\) array, got shape \(3,\)"), (np.complex64(1j), r"complex")],
)
def test_bad_numpy_losses_raise(loss, pattern: str) -> None:
    opt = EmoSens([torch.zeros(2, requires_grad=True)])
    with pytest.raises((ValueError, TypeError), match=pattern):
        opt.set_loss(loss)


def test_emo_core_does_not_import_numpy() -> None:
    source = "\n".join(p.read_text() for p in Path("emo_core").glob("*.py"))
    assert not re.search(r"^\s*(import numpy|from numpy)", source, re.MULTILINE)


# ------------------------------------------------------------ huge gradients
_PATHS = ALL_IMPLS + [(name, {}) for name in NAMES]


@pytest.mark.parametrize("case", _PATHS, ids=impl_id)
@pytest.mark.parametrize("size", [(3, 4), (512, 300)], ids=["small", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_finite_gradients_whose_squares_overflow_are_skipped_on_every_path(
    case: tuple[str, dict], size: tuple[int, int], dtype: torch.dtype
) -> None:
    """1e37 is finite but its square is not (fp32 compute): skipped like a nan, on small
    tensors as on large ones; before, small ones were applied (nan weights for EmoAiry, an
    Adam second moment stuck at inf)."""
    name, impl = case
    if dtype != torch.float32 and impl.get("fused"):
        pytest.skip("fused=True requires fp32 parameters")
    params = [torch.randn(size).to(dtype).requires_grad_() for _ in range(2)]
    params.append(torch.randn(size[1]).to(dtype).requires_grad_())
    opt = OPTIMIZERS[name](params, use_shadow=True, **impl)
    for step, loss in enumerate(scripted_losses(2)):
        set_random_grads(params, step)
        opt.step(loss=loss)
    before = (copy.deepcopy(params), copy.deepcopy(opt.state_dict()))
    set_random_grads(params, 5)
    params[0].grad[1, 1] = 1e37
    opt.step(loss=0.5)
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    for p in params:
        for value in opt.state[p].values():
            assert torch.isfinite(value).all()
    assert opt.telemetry()["skipped_steps"] == 1
    set_random_grads(params, 6)
    params[0].grad.mul_(1e12)  # large but harmless: applied, everything stays finite
    opt.step(loss=0.4)
    assert opt.telemetry()["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in params)
    if dtype == torch.float32:  # (bf16: a ~1e-3 step may round to no change)
        assert not torch.equal(params[0], before[0][0])
    for p in params:
        assert all(torch.isfinite(value).all() for value in opt.state[p].values())


def test_fp64_parameters_use_the_fp64_bound() -> None:
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = EmoSens([p])
    p.grad = torch.full((3,), 1e37, dtype=torch.float64)  # its square is fine in fp64
    opt.step(loss=1.0)
    assert opt.telemetry()["skipped_steps"] == 0 and torch.isfinite(p).all()
    p.grad = torch.full((3,), 1e160, dtype=torch.float64)
    opt.step(loss=1.0)
    assert opt.telemetry()["skipped_steps"] == 1


# --------------------------------------------------------------- maximize
@pytest.mark.parametrize("case", _PATHS, ids=impl_id)
def test_maximize_equals_minimizing_the_negated_objective(case: tuple[str, dict]) -> None:
    """``maximize=True`` fed the objective ``J`` and gradients ``dJ`` does exactly what the
    default does fed ``-J`` and ``-dJ``: the sensor sees ``-J``, a rising objective reads as
    a falling loss."""
    name, impl = case
    up, down = small_model(), small_model()
    opt_up = OPTIMIZERS[name](up.parameters(), maximize=True, **impl)
    opt_down = OPTIMIZERS[name](down.parameters(), **impl)
    for step, loss in enumerate(scripted_losses(6)):
        set_random_grads(list(up.parameters()), step)
        set_random_grads(list(down.parameters()), step, scale=-1.0)
        opt_up.step(loss=-loss)  # the objective rises as the loss falls
        opt_down.step(loss=loss)
    for p, q in zip(up.parameters(), down.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt_up.telemetry() == opt_down.telemetry()
    assert opt_up.telemetry()["scalar"] == opt_down.telemetry()["scalar"]


def test_maximize_ascends() -> None:
    w = torch.zeros(2, requires_grad=True)
    opt = EmoSens([w], maximize=True, weight_decay=0.0)
    for _ in range(5):
        opt.zero_grad()
        objective = -((w - 1.0) ** 2).sum()  # maximal at w = 1
        objective.backward()
        opt.step(loss=objective)
    assert (w > 0).all()
    assert opt.telemetry()["ema_long"] > 0  # the sensor saw -objective, a positive loss


# ---------------------------------------------------- closure returning None
@pytest.mark.parametrize("name", NAMES)
def test_closure_returning_none_with_gradients_warns_once_and_keeps_the_lr(name: str) -> None:
    model = small_model()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params)
    set_random_grads(params, 0)
    opt.step(loss=2.0)
    lr = opt.get_effective_lr()
    telemetry = opt.telemetry()
    set_random_grads(params, 1)
    with pytest.warns(UserWarning, match="received no loss"):
        opt.step(lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: None)
    assert opt.get_effective_lr() == lr
    assert {k: v for k, v in opt.telemetry().items() if k != "step"} == {
        k: v for k, v in telemetry.items() if k != "step"
    }


# ---------------------------------------------------------- empty tensors
@pytest.mark.parametrize("pulse", ["v37", "distance"])
@pytest.mark.parametrize("name", NAMES)
def test_an_empty_parameter_is_left_out_and_the_rest_trains(name: str, pulse: str) -> None:
    """A ``numel() == 0`` tensor (``Linear(0, n)``) has nothing to update: it gets no state,
    the others step as without it, and the state dict loads again (EmoAiry raised
    ZeroDivisionError on it after the sensor had advanced)."""
    with_empty, alone = small_model(), small_model()
    empty = torch.nn.Parameter(torch.zeros(0, 5))
    opt = OPTIMIZERS[name]([*with_empty.parameters(), empty], pulse=pulse)
    ref = OPTIMIZERS[name](alone.parameters(), pulse=pulse)
    for step, loss in enumerate(scripted_losses(6)):
        set_random_grads(list(with_empty.parameters()), step)
        set_random_grads(list(alone.parameters()), step)
        empty.grad = torch.zeros(0, 5)
        opt.step(loss=abs(loss) + 0.1)
        ref.step(loss=abs(loss) + 0.1)
    for p, q in zip(with_empty.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert empty not in opt.state
    fresh = OPTIMIZERS[name]([*small_model().parameters(), empty], pulse=pulse)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
