"""EmoTrainingArguments: optim names, CLI parsing, optim_args, learning_rate default, groups."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch import nn  # noqa: E402
from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

from emo_core import EmoAiry, EmoCats, EmoSens, unwrap  # noqa: E402
from emo_hf import EmoTrainer, EmoTrainingArguments, parse_optim_args  # noqa: E402
from emo_hf.train import parse_args  # noqa: E402

EMO = {"emosens": EmoSens, "emoairy": EmoAiry, "emocats": EmoCats}


def make_args(tmp_path, **kwargs) -> EmoTrainingArguments:
    return EmoTrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_every_native_optim_name_is_accepted_unchanged(tmp_path):
    for name in OptimizerNames:
        args = make_args(tmp_path, optim=name.value)
        assert args.optim is name  # the enum, exactly as TrainingArguments gives it
        assert args.learning_rate == TrainingArguments(output_dir=str(tmp_path)).learning_rate


@pytest.mark.parametrize("name", sorted(EMO))
def test_emo_names_are_accepted_in_any_case(tmp_path, name):
    args = make_args(tmp_path, optim=name.upper())
    assert args.optim == name
    assert args.to_dict()["optim"] == name
    assert OptimizerNames.ADAMW_TORCH in list(OptimizerNames)  # the enum is left as it was
    assert name not in {o.value for o in OptimizerNames}


def test_unknown_optim_lists_every_valid_name(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid optim: 'adamw_emo'") as error:
        make_args(tmp_path, optim="adamw_emo")
    message = str(error.value)
    for name in [*EMO, *(o.value for o in OptimizerNames)]:
        assert name in message


def test_cli_parses_emo_optim_and_optim_args(tmp_path):
    parser = HfArgumentParser(EmoTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--optim", "emocats", "--optim_args",
              "use_shadow=True,betas=(0.9,0.99)", "--emo_stop_on_signal"],
        look_for_args_file=False,
    )  # fmt: skip
    assert args.optim == "emocats"
    assert args.learning_rate == 1.0
    assert args.emo_stop_on_signal is True
    assert parse_optim_args(args.optim_args, EmoCats) == {"use_shadow": True, "betas": (0.9, 0.99)}


@pytest.mark.parametrize(
    ("typo", "meant"), [("emosen", "emosens"), ("EmoCat", "emocats"), ("adamw_torh", "adamw_torch")]
)
def test_cli_mistyped_optim_says_did_you_mean_and_exits_2(tmp_path, capsys, typo, meant):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--output_dir", str(tmp_path), "--optim", typo])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument --optim: Invalid optim: {typo!r} (did you mean {meant!r}?)" in err
    assert "emosens" in err and "adamw_torch" in err  # and the full list
    assert "Traceback" not in err


def test_no_suggestion_for_a_name_like_none(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid optim: 'zzzz'\. Emo optimizers"):
        make_args(tmp_path, optim="zzzz")


@pytest.mark.parametrize(
    ("optim_args", "match"),
    [
        ("use_shadw=True", r"key 'use_shadw' for EmoSens \(did you mean 'use_shadow'\?\)"),
        ("max_lr=fast", r"max_lr='fast' for EmoSens: expected float"),
        ("max_lr=-1.0", r"max_lr: -1\.0.*\(optim_args='max_lr=-1\.0'\)"),
    ],
)
def test_cli_bad_optim_args_name_the_flag_and_exit_2(tmp_path, capsys, optim_args, match):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(
            ["--output_dir", str(tmp_path), "--optim", "emosens", "--optim_args", optim_args]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"error: argument --optim_args: Invalid .*" + match, err), err
    assert "Traceback" not in err and len(err.splitlines()) <= 3  # short usage, one error


@pytest.mark.parametrize(
    ("flag", "value"), [("learning_rate", "-1"), ("learning_rate", "0"), ("weight_decay", "-0.1")]
)
def test_cli_bad_learning_rate_or_weight_decay_names_the_flag_and_exits_2(
    tmp_path, capsys, flag, value
):
    """The optimizer's range check said ``Invalid lr: -1.0``: no such flag on this CLI."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--output_dir", str(tmp_path), "--optim", "emosens", f"--{flag}", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument --{flag}: Invalid {flag}: {float(value)!r} (expected finite" in err
    assert "lr:" not in err and "Traceback" not in err
    with pytest.raises(ValueError, match=rf"Invalid {flag}: .*< ?=? ?{flag}\)"):
        make_args(tmp_path, optim="emocats", **{flag: float(value)})


def test_learning_rate_defaults_to_one_for_emo_and_says_so(tmp_path):
    with pytest.warns(UserWarning, match=r"learning_rate not set, using 1\.0") as caught:
        args = make_args(tmp_path, optim="emosens")
    assert args.learning_rate == 1.0
    assert caught[0].filename == __file__  # points at the line that built the arguments


def test_the_learning_rate_warning_names_the_users_line_however_the_arguments_are_built(
    tmp_path,
):
    """Directly, through HfArgumentParser, or by set_optimizer: the warning's line is the
    caller's (a fixed stacklevel named the caller's caller, or ``sys:1`` at module level)."""
    import inspect

    def caught_line(build) -> int:
        with pytest.warns(UserWarning, match=r"learning_rate not set") as caught:
            build()
        (warning,) = [w for w in caught if "learning_rate not set" in str(w.message)]
        assert warning.filename == __file__
        return warning.lineno

    here = inspect.currentframe().f_lineno
    direct = lambda: EmoTrainingArguments(output_dir=str(tmp_path), optim="emosens")  # noqa: E731
    parsed = lambda: HfArgumentParser(EmoTrainingArguments).parse_args_into_dataclasses(  # noqa: E731
        args=["--output_dir", str(tmp_path), "--optim", "emosens"], look_for_args_file=False
    )
    args = EmoTrainingArguments(output_dir=str(tmp_path), report_to="none")
    chosen = lambda: args.set_optimizer("emoairy")  # noqa: E731
    assert caught_line(direct) == here + 1
    assert caught_line(parsed) == here + 2
    assert caught_line(chosen) == here + 6

    assert make_args(tmp_path, optim="emosens", learning_rate=0.5).learning_rate == 0.5
    assert make_args(tmp_path, optim="adamw_torch").learning_rate == 5e-5
    parser = HfArgumentParser(EmoTrainingArguments)
    (explicit,) = parser.parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--optim", "emoairy", "--learning_rate", "5e-5"],
        look_for_args_file=False,
    )
    assert explicit.learning_rate == 5e-5  # set explicitly, even to HF's default: kept


def test_set_optimizer_accepts_emo_names(tmp_path):
    args = make_args(tmp_path).set_optimizer("emoairy", args="clip_threshold=2.0")
    assert (args.optim, args.learning_rate) == ("emoairy", 1.0)
    args.set_optimizer("sgd", learning_rate=0.1)
    assert (args.optim, args.learning_rate) == (OptimizerNames.SGD, 0.1)


@pytest.mark.parametrize(
    ("optim_args", "match"),
    [
        ("use_shadow=1", r"use_shadow='1' for EmoSens: expected bool"),
        ("use_shadow='False'", r"expected bool"),
        ("betas=(0.9,)", r"expected tuple\[float, float\]"),
        ("max_lr=fast", r"max_lr='fast' for EmoSens: expected float"),
        (
            "momentum=0.9",
            r"key 'momentum' for EmoSens; accepted keys: average, betas, capture_loss, compile_update",
        ),
        ("lr=2.0", r"use learning_rate"),
        ("weight_decay=0.1", r"use weight_decay"),
        ("eps", r"expected key=value"),
        ("max_lr=1e-2,max_lr=1e-3", r"given twice"),
    ],
)
def test_bad_optim_args_fail_at_construction_naming_the_key(tmp_path, optim_args, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, optim="emosens", optim_args=optim_args)


def test_optim_args_from_a_yaml_or_json_config_may_be_a_mapping_or_a_list(tmp_path):
    """A config file's ``optim_args:`` is naturally a mapping (or a list of entries); it
    crashed with ``'dict' object has no attribute 'strip'``."""
    config = tmp_path / "train.yaml"
    config.write_text(
        f"output_dir: {tmp_path}\noptim: emosens\nreport_to: none\n"
        "optim_args:\n  use_shadow: true\n  max_lr: 0.002\n"
    )
    (args,) = HfArgumentParser(EmoTrainingArguments).parse_yaml_file(str(config))
    assert parse_optim_args(args.optim_args, EmoSens) == {"use_shadow": True, "max_lr": 0.002}
    listed = make_args(tmp_path, optim="emocats", optim_args=["use_shadow=True", "betas=0.9,0.99"])
    assert parse_optim_args(listed.optim_args, EmoCats) == {
        "use_shadow": True,
        "betas": (0.9, 0.99),
    }
    # YAML 1.1 reads 3e-3 (no dot) as a string: it is read like a key=value entry's value
    assert parse_optim_args({"max_lr": "3e-3", "pulse": "distance"}, EmoSens) == {
        "max_lr": 0.003,
        "pulse": "distance",
    }
    with pytest.raises(ValueError, match=r"Invalid optim_args: 3 \(expected a string"):
        make_args(tmp_path, optim="emosens", optim_args=3)


def test_stop_on_signal_without_logging_is_refused_naming_both_flags(tmp_path):
    """The signal is read when logs are written; with none written it never stopped."""
    with pytest.raises(ValueError, match=r"emo_stop_on_signal=True with logging_strategy='no'"):
        make_args(tmp_path, optim="emosens", emo_stop_on_signal=True, logging_strategy="no")
    make_args(tmp_path, optim="emosens", emo_stop_on_signal=True, logging_strategy="steps")


def test_optim_args_range_errors_come_from_the_optimizer(tmp_path):
    with pytest.raises(ValueError, match="min_lr"):
        make_args(tmp_path, optim="emosens", optim_args="min_lr=1e-2,max_lr=1e-3")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 1, bias=False)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.norm(self.proj(x))).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels)}


@pytest.mark.parametrize("name", sorted(EMO))
def test_optimizer_groups_and_arguments_match_transformers(tmp_path, name):
    settings = {"weight_decay": 0.1, "report_to": "none"}
    reference = Trainer(
        model=Tiny(),
        args=TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", **settings),
    )
    reference.create_optimizer()
    optim_args = "use_shadow=True,max_lr=2e-3"
    trainer = EmoTrainer(
        model=Tiny(),
        args=EmoTrainingArguments(
            output_dir=str(tmp_path), optim=name, optim_args=optim_args, **settings
        ),
    )
    optimizer = unwrap(trainer.create_optimizer())
    assert type(optimizer) is EMO[name]
    assert optimizer.max_lr == 2e-3

    def layout(model, groups):
        names = {id(p): n for n, p in model.named_parameters()}
        return [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"]) for g in groups]

    assert layout(trainer.model, optimizer.param_groups) == layout(
        reference.model, reference.optimizer.param_groups
    )
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    for group in optimizer.param_groups:
        assert group["lr"] == 1.0 and group["use_shadow"] is True
