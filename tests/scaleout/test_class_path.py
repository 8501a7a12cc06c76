"""Class-path construction as kohya-ss sd-scripts does it (``--optimizer_type emo_core.EmoSens``).

sd-scripts imports the module part of ``--optimizer_type``, takes the class by name and calls
``cls(trainable_params, lr=args.learning_rate, **optimizer_kwargs)``, with the values of
``--optimizer_args key=value ...`` passed through ``ast.literal_eval``. Other front ends pass
the raw strings; the optimizers parse those themselves, so ``"False"`` means False.
"""

from __future__ import annotations

import ast
import copy
import importlib

import pytest
import torch
from torch import nn

import emo_core

CASES = {
    "emo_core.EmoSens": ["betas=(0.9,0.99)", "eps=1e-7", "weight_decay=0.02", "use_shadow=False"],
    "emo_core.EmoCats": ["betas=(0.9,0.99)", "weight_decay=0.02", "use_shadow=False"],
    "emo_core.EmoSensScheduleFree": ["betas=(0.9,0.99)", "eps=1e-7", "weight_decay=0.02"],
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
    assert group["use_shadow"] is False  # never bool("False") (nor a default that is True)
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


def is_schedulefree_optimizer(optimizer_type: str) -> bool:
    """sd-scripts' test: ``train()``/``eval()`` are called, and the LR scheduler is a
    constant dummy, for every ``--optimizer_type`` whose name ends in "schedulefree"."""
    return optimizer_type.lower().endswith("schedulefree")


def test_sd_scripts_treats_emosens_schedule_free_as_schedule_free_and_saves_the_average() -> None:
    """``--optimizer_type emo_core.EmoSensScheduleFree``: sd-scripts' name test picks it up,
    its loop (``train()`` after construction, ``eval()`` around sampling and before every save,
    ``train()`` again after) saves the average, and the saved state resumes bitwise."""
    optimizer_type = "emo_core.EmoSensScheduleFree"
    assert is_schedulefree_optimizer(optimizer_type)
    assert not is_schedulefree_optimizer("emo_core.EmoSens")

    def run(steps: range, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        x = torch.linspace(-1, 1, 32).reshape(8, 4)
        for _ in steps:
            loss = (model(x) - 1.0).pow(2).mean()
            loss.backward()
            opt.step(loss=loss)
            opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = load_class(optimizer_type)(model.parameters(), lr=1.0)
    assert opt.average and opt.pulse == "distance"
    assert opt.param_groups[0]["weight_decay"] == 0.0  # Schedule-Free's default (averaging.md)
    opt.train()  # sd-scripts: right after the optimizer is built
    run(range(10), model, opt)
    training_point = [p.detach().clone() for p in model.parameters()]
    opt.eval()  # before save_model: the model holds the average x
    for p, y in zip(model.parameters(), training_point):
        assert not torch.equal(p, y)
        assert torch.equal(p, opt.state[p]["x"])
        assert torch.equal(opt.state[p]["y"], y)  # (kept for train())
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    opt.train()
    run(range(10, 20), model, opt)

    resumed = nn.Linear(4, 1)
    resumed.load_state_dict(saved_model)
    # a state of either class loads into the other (EmoSens's layout)
    again = emo_core.EmoSens(resumed.parameters(), pulse="distance", average=True)
    again.load_state_dict(saved_opt)
    assert not again.training
    again.train()  # sd-scripts: before the first training step
    run(range(10, 20), resumed, again)
    for a, b in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(a, b)
