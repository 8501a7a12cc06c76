"""Class-path construction as kohya-ss sd-scripts does it (``--optimizer_type emo_core.EmoSens``).

sd-scripts imports the module part of ``--optimizer_type``, takes the class by name and calls
``cls(trainable_params, lr=args.learning_rate, **optimizer_kwargs)``, with the values of
``--optimizer_args key=value ...`` passed through ``ast.literal_eval``. Other front ends pass
the raw strings; the optimizers parse those themselves, so ``"False"`` means False.
"""

from __future__ import annotations

import ast
import importlib

import pytest
import torch
from torch import nn

import emo_core

CASES = {
    "emo_core.EmoSens": ["betas=(0.9,0.99)", "eps=1e-7", "weight_decay=0.02", "use_shadow=False"],
    "emo_core.EmoCats": ["betas=(0.9,0.99)", "weight_decay=0.02", "use_shadow=False"],
    "emo_core.EmoAiry": [
        "beta2=0.99",
        "clip_threshold=2.0",
        "weight_decay=0.02",
        "use_shadow=False",
    ],
}
EXPECTED = {
    "betas": (0.9, 0.99),
    "eps": 1e-7,
    "beta2": 0.99,
    "clip_threshold": 2.0,
    "weight_decay": 0.02,
    "use_shadow": False,
}


def load_class(optimizer_type: str) -> type[torch.optim.Optimizer]:
    """``--optimizer_type`` with a dot: import the module part, take the class by name."""
    module_name, _, class_name = optimizer_type.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def parse_args(optimizer_args: list[str], *, literal_eval: bool) -> dict[str, object]:
    """``--optimizer_args``: ``key=value`` pairs; sd-scripts literal-evals the values."""
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=", 1)
        kwargs[key] = ast.literal_eval(value) if literal_eval else value
    return kwargs


def _params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return list(nn.Linear(4, 3).parameters())


@pytest.mark.parametrize("literal_eval", [True, False], ids=["sd-scripts", "raw-strings"])
@pytest.mark.parametrize("optimizer_type", list(CASES))
def test_constructs_from_class_path_and_string_arguments(
    optimizer_type: str, literal_eval: bool
) -> None:
    cls = load_class(optimizer_type)
    assert cls is getattr(emo_core, optimizer_type.split(".")[1])
    kwargs = parse_args(CASES[optimizer_type], literal_eval=literal_eval)
    lr = 1.0 if literal_eval else "1.0"
    opt = cls(_params(), lr=lr, **kwargs)
    group = opt.param_groups[0]
    for key in kwargs:
        assert group[key] == EXPECTED[key], key
        assert type(group[key]) is type(EXPECTED[key]), key
    assert group["use_shadow"] is False  # never bool("False")
    assert group["lr"] == 1.0 and "scope" not in group  # lr: a plain multiplier


@pytest.mark.parametrize("value", ["True", "False", True, False])
def test_boolean_strings_are_parsed_not_truth_tested(value: object) -> None:
    opt = emo_core.EmoSens(_params(), use_shadow=value, stochastic_rounding=value)
    expected = value in ("True", True)
    assert opt.param_groups[0]["use_shadow"] is expected
    assert opt.stochastic_rounding is expected


@pytest.mark.parametrize(
    ("key", "value"),
    [("use_shadow", "maybe"), ("betas", "(0.9,)"), ("weight_decay", "-1"), ("eps", "abc")],
)
def test_bad_string_arguments_name_the_argument(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"Invalid {key}"):
        load_class("emo_core.EmoSens")(_params(), lr=1.0, **{key: value})


def test_sd_scripts_param_groups_scale_the_pulse() -> None:
    """sd-scripts passes per-network groups with their own lr: multipliers on ``--learning_rate``."""
    unet, text_encoder = _params(), _params()
    opt = load_class("emo_core.EmoSens")(
        [{"params": unet, "lr": 1.0}, {"params": text_encoder, "lr": 0.5}], lr=1.0
    )
    for p in unet + text_encoder:
        p.grad = torch.ones_like(p)
    opt.step(loss=1.0)
    unet_lr, text_encoder_lr = opt.get_effective_lr()
    assert text_encoder_lr == pytest.approx(0.5 * unet_lr)


@pytest.mark.parametrize("literal_eval", [True, False], ids=["sd-scripts", "raw-strings"])
def test_capture_loss_from_optimizer_args_senses_an_unchanged_loop(literal_eval: bool) -> None:
    """``--optimizer_args capture_loss=True``: a script that never passes the loss trains."""
    kwargs = parse_args(["capture_loss=True"], literal_eval=literal_eval)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = load_class("emo_core.EmoSens")(model.parameters(), lr=1.0, **kwargs)
    x = torch.randn(8, 4)
    losses = []
    for _ in range(3):  # the loop of a script written for AdamW
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    telemetry = opt.telemetry()
    assert telemetry["sensed_steps"] == 3
    assert telemetry["ema_short"] == pytest.approx(
        0.3 * losses[2] + 0.7 * (0.3 * losses[1] + 0.7 * losses[0])
    )
    opt.close()
    assert not emo_core.capture.capture_installed()


def test_the_script_default_learning_rate_warns_with_the_fix() -> None:
    """``--learning_rate 1e-4`` (every script's default) would silently learn nothing."""
    with pytest.warns(UserWarning, match=r"--learning_rate 1.0") as caught:
        load_class("emo_core.EmoCats")(_params(), lr=1e-4)
    assert caught[0].filename == __file__
