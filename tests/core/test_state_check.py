"""load_state_dict validates everything before changing anything (issue 13, items 1 and 5).

Each case saves a real checkpoint file, corrupts one entry, writes it back and loads it from
disk: the load must raise one ValueError naming the entry, and the optimizer must be bitwise
as it was and still step.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from emo_core import EmoAiry, EmoCats, EmoSens
from tests.core.cases import (
    NAMES,
    OPTIMIZERS,
    assert_same,
    scripted_losses,
    set_random_grads,
    small_model,
)

Corrupt = Callable[[dict, str], None]


def _first_key(name: str, averaged: bool = False) -> str:
    """The first per-parameter state key (averaged EmoSens keeps the average ``x`` there)."""
    if averaged and name == "emosens":
        return "x"
    return {"emosens": "exp_avg", "emoairy": "row_var", "emocats": "exp_avg"}[name]


def _not_averaged(name: str) -> dict:
    """The arguments that turn the default iterate averaging off (EmoAiry has none)."""
    return {} if name == "emoairy" else {"average": False}


def _emo(sd: dict) -> dict:
    return sd["param_groups"][0]["emo_state"]


def _set(path: str, value) -> Corrupt:
    """A corruption that sets ``sd[...path...] = value`` (path of keys separated by '/')."""

    def apply(sd: dict, name: str) -> None:
        target = sd
        keys = [_first_key(name) if k == "{key}" else k for k in path.split("/")]
        keys = [int(k) if k.isdigit() else k for k in keys]
        for key in keys[:-1]:
            target = _emo(target) if key == "emo" else target[key]
        target[keys[-1]] = value(target.get(keys[-1])) if callable(value) else value

    return apply


def _delete(path: str) -> Corrupt:
    def apply(sd: dict, name: str) -> None:
        target = sd
        keys = [_first_key(name) if k == "{key}" else k for k in path.split("/")]
        keys = [int(k) if k.isdigit() else k for k in keys]
        for key in keys[:-1]:
            target = _emo(target) if key == "emo" else target[key]
        del target[keys[-1]]

    return apply


def _extra_group(sd: dict, name: str) -> None:
    sd["param_groups"].append({**sd["param_groups"][0], "params": [99]})
    del sd["param_groups"][-1]["emo_state"]


def _drop_param(sd: dict, name: str) -> None:
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]


def _as_format_1(sd: dict, name: str) -> None:
    emo = sd["param_groups"][0].pop("emo_state")
    sd["state"]["emo_pulse"], sd["state"]["emo_meta"] = emo["emo_pulse"], emo["emo_meta"]


# (case id, corruption, expected message; {key} = the optimizer's first moment key)
CORRUPTIONS: list[tuple[str, Corrupt, str]] = [
    (
        "short-moment",
        _set("state/0/{key}", torch.zeros(3)),
        r"state\[0\]\['{key}'\] has shape \(3,\) but (parameter 0 has shape \(5, 6\)"
        r"|EmoAiry keeps shape \(5, 1\) for a parameter of shape \(5, 6\))",
    ),
    (
        "integer-moment",
        _set("state/0/{key}", lambda v: v.to(torch.int32)),
        r"state\[0\]\['{key}'\] has dtype torch.int32, expected a floating dtype",
    ),
    (
        "float8-moment",
        _set("state/0/{key}", lambda v: v.to(torch.float8_e4m3fn)),
        r"state\[0\]\['{key}'\] has dtype torch.float8_e4m3fn, expected one of",
    ),
    ("nan-moment", _set("state/0/{key}", lambda v: v * float("nan")), r"contains nan or inf"),
    ("number-moment", _set("state/0/{key}", 0.5), r"state\[0\]\['{key}'\] is a float"),
    ("missing-moment", _delete("state/0/{key}"), r"state\[0\] lacks \['{key}'\]"),
    (
        "unknown-key",
        _set("state/1/momentum_buffer", torch.zeros(5)),
        r"state\[1\] has unknown entries \['momentum_buffer'\]",
    ),
    ("state-not-a-dict", _set("state/1", torch.zeros(5)), r"state\[1\] is a Tensor"),
    ("stray-id", _set("state/42", {}), r"state\[42\] belongs to no parameter"),
    ("sensor-nan-H", _set("emo/emo_pulse/H", torch.tensor(float("nan"))), r"emo_pulse\['H'\]"),
    ("sensor-inf-ema", _set("emo/emo_pulse/ema_long", torch.tensor(float("inf"))), r"nan or inf"),
    ("sensor-missing", _delete("emo/emo_pulse/ema_long"), r"emo_pulse' lacks 'ema_long'"),
    (
        "sensor-short-hist",
        _set("emo/emo_pulse/hist", torch.zeros(16)),
        r"emo_pulse\['hist'\] has shape \(16,\) but expected \(32,\)",
    ),
    ("sensor-unknown", _set("emo/emo_pulse/mood", torch.zeros(())), r"unknown entries \['mood'\]"),
    ("sensor-gone", _delete("emo/emo_pulse"), r"'emo_pulse' is missing"),
    ("meta-gone", _delete("emo/emo_meta"), r"'emo_meta' is missing"),
    ("meta-steps", _set("emo/emo_meta/steps", -3), r"emo_meta\['steps'\] is -3"),
    ("meta-seed", _set("emo/emo_meta/seed", "x"), r"emo_meta\['seed'\] is 'x'"),
    ("other-class", _set("emo/optimizer", "EmoLynx"), r"written by EmoLynx, not Emo"),
    ("format", _set("emo/format", 9), r"format 9 is not known"),
    ("group-count", _extra_group, r"it has 2 param groups but the optimizer has 1"),
    ("group-size", _drop_param, r"param_groups\[0\] has 4 parameters but .* has 5"),
    ("group-lr-inf", _set("param_groups/0/lr", float("inf")), r"param_groups\[0\]: Invalid lr"),
    ("group-wd-nan", _set("param_groups/0/weight_decay", float("nan")), r"Invalid weight_decay"),
    (
        "group-lr-tensor-nan",
        _set("param_groups/0/lr", torch.tensor(float("nan"))),
        r"param_groups\[0\]: Invalid lr",
    ),
    ("no-emo-entry", _delete("param_groups/0/emo_state"), r"not written by an Emo optimizer"),
    (  # the LR of a step without a loss: the parameters climbed the gradient
        "sensor-negative-pulse",
        _set("emo/emo_pulse/pulse", torch.tensor(-5.0, dtype=torch.float64)),
        r"emo_pulse\['pulse'\] holds -5\.\.-5, expected values > 0",
    ),
    (
        "sensor-scalar-beyond-tanh",
        _set("emo/emo_pulse/scalar", torch.tensor(2.0, dtype=torch.float64)),
        r"emo_pulse\['scalar'\] holds 2\.\.2, expected values >= -1 and <= 1",
    ),
    (
        "sensor-hist-count",
        _set("emo/emo_pulse/hist_count", torch.tensor(1000)),
        r"emo_pulse\['hist_count'\] holds 1000",
    ),
    ("meta-steps-huge", _set("emo/emo_meta/steps", 2**64), r"emo_meta\['steps'\] is 1844"),
    ("state-a-list", _set("state", []), r"'state' is a list, expected a dict"),
    ("group-params-int", _set("param_groups/0/params", 3), r"param_groups must be a list"),
]


def _trained(name: str, steps: int = 4, **kwargs) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = small_model()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params, **kwargs)
    for step, loss in enumerate(scripted_losses(steps)):
        set_random_grads(params, step)
        opt.step(loss=loss)
    return model, opt


def _snapshot(model, opt) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _load_file(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("corrupt", "pattern"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS]
)
def test_corrupt_checkpoint_file_is_refused_and_changes_nothing(
    tmp_path: Path, name: str, corrupt: Corrupt, pattern: str
) -> None:
    _, source = _trained(name, use_shadow=True)  # the loaded groups bring use_shadow along
    path = tmp_path / "optimizer.pt"
    torch.save(source.state_dict(), path)
    corrupted = _load_file(path)
    corrupt(corrupted, name)
    torch.save(corrupted, path)

    # (not averaged: a shadow is refused with averaging, which use_shadow=True turns off)
    model, opt = _trained(name, steps=2, **_not_averaged(name))
    before = _snapshot(model, opt)
    with pytest.raises(
        ValueError, match="Invalid state_dict: .*" + pattern.replace("{key}", _first_key(name))
    ):
        opt.load_state_dict(_load_file(path))
    assert_same(model.state_dict(), before[0])
    assert_same(opt.state_dict(), before[1])
    set_random_grads(list(model.parameters()), 9)
    opt.step(loss=0.3)  # still usable
    assert opt.telemetry()["sensed_steps"] == 3


CROSS_LOADS = [
    (EmoSens, EmoCats, "format-2", r"written by EmoSens, not EmoCats"),
    (EmoCats, EmoAiry, "format-2", r"written by EmoCats, not EmoAiry"),
    (EmoSens, EmoCats, "format-1", r"state\[0\] has unknown entries \['exp_avg_sq'\]"),
    (EmoCats, EmoSens, "format-1", r"state\[0\] lacks \['exp_avg_sq'\]"),
    (EmoAiry, EmoSens, "format-1", r"state\[0\] lacks \['exp_avg', 'exp_avg_sq'\]"),
    (EmoSens, EmoSens, "adamw-moments", r"state\[0\] has unknown entries \['step'\]"),
    (EmoSens, EmoAiry, "format-1", r"state\[0\] lacks \['col_var', 'row_var', 'step'\]"),
]


@pytest.mark.parametrize(("writer", "reader", "layout", "pattern"), CROSS_LOADS)
def test_state_of_another_emo_optimizer_is_refused(
    writer, reader, layout: str, pattern: str
) -> None:
    name = {EmoSens: "emosens", EmoAiry: "emoairy", EmoCats: "emocats"}[writer]
    # format 1 predates the distance controller: its state dicts are v3.7's
    kwargs = {} if layout == "format-2" else {"pulse": "v37"}
    _, source = _trained(name, **kwargs)
    sd = source.state_dict()
    if layout != "format-2":
        _as_format_1(sd, name)
    if layout == "adamw-moments":  # EmoSens's keys plus AdamW's step counter
        for entry in sd["state"].values():
            if "exp_avg" in entry:
                entry["step"] = torch.tensor(3.0)
    model = small_model()
    opt = reader(model.parameters(), **kwargs)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)


def test_torch_adamw_state_is_refused_with_a_clear_error() -> None:
    model = small_model()
    adamw = torch.optim.AdamW(model.parameters())
    set_random_grads(list(model.parameters()), 0)
    adamw.step()
    opt = EmoSens(model.parameters())
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(
        ValueError, match=r"not written by an Emo optimizer.*AdamW.*load only the model"
    ):
        opt.load_state_dict(adamw.state_dict())
    assert_same(opt.state_dict(), before)


@pytest.mark.parametrize("name", NAMES)
def test_format_1_state_dicts_keep_loading_and_resume_exactly(name: str) -> None:
    """State dicts written before format 2 (sensor in ``state``, no class name), which
    predates the distance controller: v3.7's."""
    ref_model, ref_opt = _trained(name, steps=8, pulse="v37")
    model, opt = _trained(name, steps=4, pulse="v37")
    sd = copy.deepcopy(opt.state_dict())
    _as_format_1(sd, name)
    fresh_model = small_model(seed=1)
    fresh_model.load_state_dict(model.state_dict())
    fresh = OPTIMIZERS[name](fresh_model.parameters(), pulse="v37")
    fresh.load_state_dict(sd)
    params = list(fresh_model.parameters())
    for step, loss in list(enumerate(scripted_losses(8)))[4:]:
        set_random_grads(params, step)
        fresh.step(loss=loss)
    assert_same(fresh_model.state_dict(), ref_model.state_dict())
    assert fresh.telemetry() == ref_opt.telemetry()


@pytest.mark.parametrize("as_type", [int, float], ids=["int", "float"])
def test_emoairy_step_saved_as_a_python_number_loads(as_type) -> None:
    """torch's optimizers accept ``step`` as a number; EmoAiry crashed at the next step."""
    ref_model, ref_opt = _trained("emoairy", steps=6)
    model, opt = _trained("emoairy", steps=3)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        entry["step"] = as_type(entry["step"].item())
    opt.load_state_dict(sd)
    assert all(opt.state[p]["step"].dtype == torch.float32 for p in model.parameters())
    params = list(model.parameters())
    for step, loss in list(enumerate(scripted_losses(6)))[3:]:
        set_random_grads(params, step)
        opt.step(loss=loss)
    assert_same(model.state_dict(), ref_model.state_dict())


def test_bf16_parameters_keep_fp32_state_after_a_checked_load() -> None:
    p = torch.zeros(4, 3, dtype=torch.bfloat16, requires_grad=True)
    opt = EmoSens([p])
    p.grad = torch.ones_like(p)
    opt.step(loss=1.0)
    fresh = EmoSens([p])
    fresh.load_state_dict(opt.state_dict())
    # (bf16 parameters are not averaged by default: exp_avg, not x)
    assert {key: t.dtype for key, t in fresh.state[p].items()} == dict.fromkeys(
        ("exp_avg", "exp_avg_sq"), torch.float32
    )


_FUSED_SCRIPT = textwrap.dedent(
    """
    import io
    import torch
    from emo_core import EmoSens
    # the default (averaged: the kernel gets exp_avg_sq, the average x stays out of it) and
    # v3.7's configuration (exp_avg and exp_avg_sq)
    for kwargs, key in (({}, "exp_avg_sq"), ({"pulse": "v37"}, "exp_avg")):
        p = torch.zeros(64, 64, requires_grad=True)
        opt = EmoSens([p], **kwargs)  # on fp32 CPU parameters: torch's fused AdamW kernel
        p.grad = torch.ones_like(p)
        opt.step(loss=1.0)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)  # (state_dict() shares the live per-param dicts)
        buffer.seek(0)
        sd = torch.load(buffer, weights_only=True)
        sd["state"][0][key] = torch.zeros(4)
        try:
            opt.load_state_dict(sd)
        except ValueError as error:
            print("refused:", error)
        p.grad = torch.ones_like(p)
        opt.step(loss=1.0)
        print("stepped", bool(torch.isfinite(p).all()))
    """
)


def test_mis_shaped_moment_never_reaches_the_fused_kernel() -> None:
    """Before: the fused kernel wrote past the 4-element buffer and the process died (SIGABRT)."""
    result = subprocess.run(
        [sys.executable, "-c", _FUSED_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for key in ("exp_avg_sq", "exp_avg"):
        assert f"refused: Invalid state_dict: state[0]['{key}'] has shape (4,)" in result.stdout
    assert result.stdout.count("stepped True") == 2


def test_live_state_mutated_to_a_wrong_shape_is_refused_before_the_fused_kernel() -> None:
    p = torch.zeros(8, 8, requires_grad=True)
    opt = EmoSens([p])
    p.grad = torch.ones_like(p)
    opt.step(loss=1.0)
    opt.state[p]["exp_avg_sq"] = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"state\['exp_avg_sq'\] of shape \(4,\)"):
        opt.step(loss=1.0)


@pytest.mark.parametrize(("name", "key"), [("emosens", "exp_avg_sq"), ("emoairy", "row_var")])
def test_a_negative_second_moment_is_refused_and_changes_nothing(name: str, key: str) -> None:
    """Its square root is nan, which the next finite step wrote into the parameter."""
    _, source = _trained(name)
    saved = source.state_dict()
    saved["state"][0][key] = -saved["state"][0][key].abs() - 1.0
    model, opt = _trained(name, steps=2)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"state\[0\]\['{key}'\] holds negative values"):
        opt.load_state_dict(saved)
    assert_same(model.state_dict(), before[0])
    assert_same(opt.state_dict(), before[1])


@pytest.mark.parametrize("name", NAMES)
def test_a_state_on_the_meta_device_is_refused_by_name(name: str) -> None:
    _, source = _trained(name)
    saved = source.state_dict()
    key = _first_key(name, averaged=source.average)
    saved["state"][0][key] = torch.empty_like(saved["state"][0][key], device="meta")
    _, opt = _trained(name, steps=2)
    with pytest.raises(ValueError, match=rf"state\[0\]\['{key}'\] is on the meta device"):
        opt.load_state_dict(saved)
