"""emo_diffusers.train_lora_flow: tiny SD3/Flux LoRA runs with real diffusers, peft, accelerate."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from emo_diffusers.conditioning import load_conditioner  # noqa: E402
from emo_diffusers.data import load_images  # noqa: E402
from emo_diffusers.lora import LORA_WEIGHT_NAME, load_lora  # noqa: E402
from emo_diffusers.models import TINY_CONFIGS, FlowModel, build_base_model, load_transformer  # noqa: E402
from emo_diffusers.train_lora_flow import (  # noqa: E402
    build_training,
    main,
    parse_args,
    save_outputs,
    train,
    train_step,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "sd3": ROOT / "configs" / "diffusers" / "tiny_sd3_lora.yaml",
    "flux": ROOT / "configs" / "diffusers" / "tiny_flux_lora.yaml",
}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each run here starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _argv(model_type: str, out: Path, *extra: str) -> list[str]:
    """A short run of the shipped config: small batches, few sampling steps, no TensorBoard.

    A random-init base (``--pretrain_steps 0``, in ``<out>/base_model``) and no sample
    classifier: the pretrained pipeline has its own tests (test_diffusers_pipeline.py).
    """
    return [
        "--config",
        str(CONFIGS[model_type]),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "20",
        "--train_batch_size",
        "8",
        "--checkpointing_steps",
        "0",
        "--samples_per_class",
        "1",
        "--num_inference_steps",
        "4",
        "--report_to",
        "none",
        "--disable_progress_bar",
        "--pretrain_steps",
        "0",
        "--no-evaluate",
        "--cache_dir",
        str(out / ".cache"),
        *extra,
    ]


def _lora_tensors(out: Path) -> dict[str, torch.Tensor]:
    weights = load_file(out / LORA_WEIGHT_NAME)
    weights.update(
        {f"cond.{k}": v for k, v in load_file(out / "class_conditioner.safetensors").items()}
    )
    return weights


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- arguments
def test_config_then_command_line(tmp_path: Path) -> None:
    args = parse_args(["--config", str(CONFIGS["flux"]), "--optimizer", "adamw"])
    assert args.model_type == "flux"
    assert args.transformer_config["axes_dims_rope"] == [4, 6, 6]
    assert args.optimizer == "adamw"  # the command line wins over the YAML
    assert args.mixed_precision == "bf16" and args.stochastic_rounding is True
    assert parse_args(["--no-stochastic_rounding"]).stochastic_rounding is False


def test_unknown_optimizer_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--optimizer", "sgd"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and "emosens" in err and "prodigy" in err


def test_yaml_scalars_mean_what_they_say(tmp_path: Path) -> None:
    """``train_classes: 7`` is class 7 (it crashed), ``pretrain_classes: 0`` is class 0 (it
    meant all), ``mixed_precision: no`` is "no" (YAML 1.1 reads it as false)."""
    config = tmp_path / "c.yaml"
    config.write_text("train_classes: 7\npretrain_classes: 0\nmixed_precision: no\n")
    args = parse_args(["--config", str(config)])
    assert (args.train_classes, args.pretrain_classes) == ("7", "0")
    assert args.mixed_precision == "no"


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--samples_per_class", "0"),
        ("--num_inference_steps", "0"),
        ("--scheduler_shift", "0"),
        ("--logit_std", "-1"),
    ],
)
def test_a_bad_value_is_refused_before_training(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args([flag, value])
    assert f"{flag} must be" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model_type", "argv", "message"),
    [
        ("sd3", ["--resolution", "6"], "resolution: 6 (latents are 3x3, not a multiple of"),
        ("sd3", ["--resolution", "10", "--no-evaluate"], "of the transformer's patch_size 2"),
        ("sd3", ["--resolution", "36"], "more than the transformer's pos_embed_max_size 8"),
        ("flux", ["--resolution", "10", "--no-evaluate"], "Flux packs 2x2 latent patches"),
        (
            "sd3",
            ["--resolution", "6", "--evaluate", "--transformer_config", '{"patch_size": 1}'],
            "the --evaluate classifier needs a multiple of 4",
        ),
    ],
)
def test_a_resolution_the_model_cannot_take_is_refused_before_training(
    model_type: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even was not enough: SD3 failed in its first forward with a bare RuntimeError."""
    with pytest.raises(SystemExit):
        parse_args(["--config", str(CONFIGS[model_type]), *argv])
    assert message in capsys.readouterr().err
    parse_args(["--config", str(CONFIGS[model_type]), "--resolution", "12"])  # fine


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning_rate", "-1"], "Invalid learning_rate: -1.0 (expected finite 0.0 < learning"),
        (["--weight_decay", "-1"], "Invalid weight_decay: -1.0"),
        (["--optimizer_args", "max_lr=-1"], "Invalid max_lr: -1.0"),
        (["--optimizer_args", "min_lr=1", "max_lr=0.1"], "min_lr"),
        (["--optimizer", "adamw", "--learning_rate", "-1"], "Invalid learning rate: -1.0"),
    ],
)
def test_an_out_of_range_optimizer_value_is_refused_before_pretraining(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The optimizer checked its values when built: after the base's 3000 pretraining steps."""
    with pytest.raises(SystemExit):
        parse_args(["--config", str(CONFIGS["sd3"]), *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("optimizer: sgd\n", "invalid choice: 'sgd'"),
        ("learning_rat: 1.0\n", "unknown key 'learning_rat'; did you mean 'learning_rate'?"),
        ("optimizer_args: 3\n", "optimizer_args must be a mapping"),
        ("optimizer_args: {max_lrr: 1.0e-3}\n", "'max_lrr' for EmoSens (did you mean 'max_lr'?)"),
        ("train_classes: [5, 10]\n", "train_classes: 10 not among the data's classes"),
        ("stochastic_rounding: 'False'\n", "stochastic_rounding must be true or false"),
    ],
)
def test_bad_config_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str, message: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- short runs
@pytest.mark.parametrize("model_type", ["sd3", "flux"])
def test_bf16_run_trains_only_lora_and_reloads(tmp_path: Path, model_type: str) -> None:
    out = tmp_path / model_type
    extra = ("--report_to", "tensorboard") if model_type == "sd3" else ()
    setup = build_training(parse_args(_argv(model_type, out, *extra)))
    model = setup.accelerator.unwrap_model(setup.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    summary = train(setup)
    paths, evaluation = save_outputs(setup)
    assert evaluation == {}  # --no-evaluate
    setup.accelerator.end_training()

    assert summary["steps"] == 20 and summary["all_finite"]
    lora_changed = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.dtype == torch.bfloat16, name  # LoRA stays bf16 in bf16 mode
            lora_changed += not torch.equal(param, before[name])
        elif name.startswith("transformer."):
            assert torch.equal(param, before[name]), f"base weight {name} changed"
    n_lora = sum("lora_" in n for n in before)
    assert lora_changed >= n_lora // 2, f"only {lora_changed}/{n_lora} LoRA tensors moved"
    assert not torch.equal(model.conditioner.tokens.weight, before["conditioner.tokens.weight"])
    # The frozen base is bitwise the "pretrained" model on disk.
    _, base = load_transformer(out / "base_model", torch.bfloat16)
    for name, param in base.named_parameters():
        assert torch.equal(param, model.transformer.get_parameter(name)), name

    for key in ("lora", "conditioner", "samples", "curve", "history"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    if extra:
        assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"

    # The pipelines' loader (what pipeline.load_lora_weights reads) parses the file.
    from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin

    mixin = SD3LoraLoaderMixin if model_type == "sd3" else FluxLoraLoaderMixin
    state, metadata = mixin.lora_state_dict(str(out), return_lora_metadata=True)
    assert len(state) == n_lora and all(k.startswith("transformer.") for k in state)
    assert metadata["transformer.r"] == 8  # the shipped configs' rank

    # A fresh base + the saved LoRA and conditioner reproduce the trained model.
    _, fresh = load_transformer(out / "base_model", torch.bfloat16)
    load_lora(fresh, out)
    reloaded = FlowModel(fresh, load_conditioner(out), model_type)
    latents = torch.randn(4, model.latent_channels, 8, 8)
    timesteps, labels = torch.tensor([900.0, 500.0, 100.0, 10.0]), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        assert torch.equal(reloaded(latents, timesteps, labels), model(latents, timesteps, labels))


# 20 steps with a checkpoint at 10, resumed from it, against the uninterrupted 20 steps.
@pytest.mark.parametrize(("precision", "steps"), [("no", 20), ("bf16", 20)])
def test_resume_equals_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], precision: str, steps: int
) -> None:
    half = str(steps // 2)
    common = ("--mixed_precision", precision, "--checkpointing_steps", half)
    argv = _argv("sd3", tmp_path, *common, "--max_train_steps", str(steps))
    uninterrupted = main(argv)
    expected = _lora_tensors(tmp_path)
    checkpoint = load_file(tmp_path / f"checkpoint-{half}" / "trainable_0.safetensors")
    assert checkpoint and all("lora_" in k or k.startswith("conditioner.") for k in checkpoint)

    finished = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    # Resuming the finished run: a message, the run's metrics, and no file rewritten.
    again = main([*argv, "--resume_from_checkpoint", str(tmp_path / f"checkpoint-{steps}")])
    assert "already at max_train_steps=20, nothing to do" in capsys.readouterr().out
    assert again["final_loss"] == uninterrupted["final_loss"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()} == finished
    shutil.rmtree(tmp_path / f"checkpoint-{steps}")
    for name in (LORA_WEIGHT_NAME, "class_conditioner.safetensors"):
        (tmp_path / name).unlink()

    resumed = main([*argv, "--resume_from_checkpoint", "latest"])  # from the middle

    _assert_bitwise_equal(_lora_tensors(tmp_path), expected)
    assert resumed["steps"] == steps
    assert resumed["final_loss"] == uninterrupted["final_loss"]  # history restored, same losses
    if precision == "bf16":  # a new run, same seed: stochastic rounding draws the same bits
        again = tmp_path / "again"
        base = ("--base_model_dir", str(tmp_path / "base_model"))
        main(_argv("sd3", again, *common, *base, "--max_train_steps", half))
        _assert_bitwise_equal(
            load_file(again / f"checkpoint-{half}" / "trainable_0.safetensors"),
            load_file(tmp_path / f"checkpoint-{half}" / "trainable_0.safetensors"),
        )


def test_emo_optimizer_senses_mean_of_accumulated_losses(tmp_path: Path) -> None:
    argv = _argv("sd3", tmp_path, "--mixed_precision", "no", "--gradient_accumulation_steps", "2")
    setup = build_training(parse_args(argv))
    emo = setup.emo
    first = train_step(setup, 0)
    assert emo.telemetry()["sensed_steps"] == 0  # no optimizer step after one micro-batch
    second = train_step(setup, 1)
    telemetry = emo.telemetry()
    assert telemetry["sensed_steps"] == 1 and telemetry["step"] == 1
    # The first sensed loss initialises the EMAs: it is the mean of the two micro-batches.
    assert telemetry["ema_long"] == pytest.approx(float((first + second) / 2), rel=1e-6)
    assert first != second


@pytest.mark.parametrize("name", ["emosens", "emoairy", "emocats", "adamw", "prodigy"])
def test_every_optimizer_choice_trains(tmp_path: Path, name: str) -> None:
    argv = _argv("sd3", tmp_path, "--mixed_precision", "no", "--optimizer", name)
    setup = build_training(parse_args([*argv, "--train_batch_size", "4"]))
    model = setup.accelerator.unwrap_model(setup.model)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    losses = [train_step(setup, i) for i in range(2)]
    assert all(torch.isfinite(v) for v in losses)
    # The last SD3 block drops the text stream, so its text-query LoRA gets no gradient.
    dead = "transformer_blocks.1.attn.add_q_proj"
    moved = {n: not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora}
    assert all(v for n, v in moved.items() if dead not in n)
    assert not any(v for n, v in moved.items() if dead in n)
    assert (setup.emo is not None) == name.startswith("emo")


def test_averaging_trains_and_ends_at_the_average(tmp_path: Path) -> None:
    """--optimizer_args pulse=distance average=True: the loop trains at the training point
    (step() refuses eval mode) and leaves the LoRA at the average for sampling and saving."""
    argv = _argv("sd3", tmp_path, "--mixed_precision", "no", "--max_train_steps", "3")
    args = parse_args([*argv, "--optimizer_args", "pulse=distance", "average=True"])
    setup = build_training(args)
    train(setup)
    emo = setup.emo
    assert emo.average and not emo.training
    model = setup.accelerator.unwrap_model(setup.model)
    average = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    emo.train()
    moved = [not torch.equal(p, average[n]) for n, p in model.named_parameters() if n in average]
    assert any(moved)


def test_a_run_resumed_from_its_final_checkpoint_ends_at_the_average_too(tmp_path: Path) -> None:
    """Killed after its last checkpoint, before its outputs: the rerun has nothing to train
    but must still sample and save the average, not the checkpoint's training point."""
    argv = [
        *_argv("sd3", tmp_path, "--mixed_precision", "no", "--max_train_steps", "3"),
        *("--checkpointing_steps", "3", "--optimizer_args", "pulse=distance", "average=True"),
    ]
    first = build_training(parse_args(argv))
    train(first)
    model = first.accelerator.unwrap_model(first.model)
    average = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    again = build_training(parse_args([*argv, "--resume_from_checkpoint", "latest"]))
    assert train(again)["nothing_to_do"]
    assert not again.emo.training
    resumed = again.accelerator.unwrap_model(again.model)
    for name, p in resumed.named_parameters():
        if name in average:
            assert torch.equal(p, average[name]), name


def test_seconds_per_step_are_per_step_whatever_ends_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step takes at least 0.3 s: each record says so, also for an interval a
    checkpoint or the last step cut short (they divided by logging_steps: 3x too fast)."""
    import emo_diffusers.train_lora_flow as script

    step = script.train_step

    def slow_step(*args, **kwargs):
        time.sleep(0.3)
        return step(*args, **kwargs)

    monkeypatch.setattr(script, "train_step", slow_step)
    argv = _argv("sd3", tmp_path, "--mixed_precision", "no", "--max_train_steps", "7")
    args = parse_args([*argv, "--logging_steps", "3", "--checkpointing_steps", "2"])
    setup = build_training(args)
    train(setup)
    seconds = setup.history.seconds
    assert len(seconds) == 3 and min(seconds) >= 0.3, seconds


def test_train_data_dir_of_generated_pngs(tmp_path: Path) -> None:
    from PIL import Image, ImageDraw

    data = tmp_path / "shapes"
    for label, shape in enumerate(("square", "disc")):
        (data / shape).mkdir(parents=True)
        for i in range(3):
            img = Image.new("RGB", (24, 24), "black")
            box = (3 + i, 3 + i, 18 + i, 18 + i)
            draw = ImageDraw.Draw(img)
            (draw.rectangle if label == 0 else draw.ellipse)(box, fill=(255, 200, 50))
            img.save(data / shape / f"{i}.png")
    base = build_base_model("sd3", TINY_CONFIGS["sd3"], tmp_path / "my_base")  # any local dir
    out = tmp_path / "out"
    summary = main(
        _argv(
            "sd3",
            out,
            "--pretrained_model_name_or_path",
            str(base),
            "--train_data_dir",
            str(data),
            "--train_batch_size",
            "4",
            "--max_train_steps",
            "3",
            "--mixed_precision",
            "no",
            "--train_classes",
            "",
        )
    )
    assert summary["all_finite"] and summary["steps"] == 3
    assert load_conditioner(out).num_classes == 2
    # base | base + LoRA, each 2 classes x 1 sample of 16 px, 1 px gaps, x4; 12 px between,
    # a 28 px header of titles and class names.
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (2 * (2 * 17 + 1) * 4 + 12, (1 * 17 + 1) * 4 + 28)

    assert not (out / "base_model").exists()  # the given base was used, none was built
    with pytest.raises(ValueError, match="base_model_dir.*num_layers"):  # never a silent reuse
        build_base_model("sd3", {**TINY_CONFIGS["sd3"], "num_layers": 1}, base)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        load_images(16, 1, empty)
    with pytest.raises(ValueError, match="pretrained_model_name_or_path.*config.json"):
        load_transformer(empty, torch.float32)


def test_train_data_dir_hidden_folders_are_no_classes_and_empty_ones_are_refused(
    tmp_path: Path,
) -> None:
    """An empty (or a hidden .ipynb_checkpoints) folder was a class with no images: sampled
    and measured, it capped sample_accuracy_lora at the share of the real classes."""
    from PIL import Image

    from emo_diffusers.data import class_names

    data = tmp_path / "data"
    for name in ("a", "b", ".ipynb_checkpoints"):
        (data / name).mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("L", (16, 16), 255).save(data / name / "0.png")
    assert class_names(data) == ("a", "b")
    assert load_images(16, 1, data).class_names == ("a", "b")
    (data / "c").mkdir()
    (data / "c" / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"no readable images in the class folder\(s\) c of"):
        load_images(16, 1, data)


@pytest.mark.parametrize("channels", [1, 3])
def test_train_data_dir_16_bit_grey_pngs_keep_their_values(tmp_path: Path, channels: int) -> None:
    """PIL's convert("L") clips 16-bit values at 255: every mid-grey image came out white."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(tmp_path / "grey.png")  # 128 * 257
    assert Image.open(tmp_path / "grey.png").mode.startswith("I")
    images = load_images(16, channels, tmp_path).images
    assert images.shape == (1, channels, 16, 16)
    assert torch.allclose(images, torch.full_like(images, 128 / 127.5 - 1.0), atol=1e-6)


def test_a_real_sd3_or_flux_latent_width_is_refused_with_what_fits() -> None:
    """Real SD3 (in_channels 16) and Flux (64) give 16 latent channels: 4 image channels."""
    with pytest.raises(ValueError, match=r"in_channels 4 or 12 for SD3, 16 or 48 for Flux"):
        load_images(16, 4)


def test_euler_sampling_reaches_the_data_with_the_exact_velocity() -> None:
    """With the true velocity of a single data point, the sampler lands on that point."""
    from emo_diffusers.data import PixelCodec
    from emo_diffusers.sampling import sample_images

    target = torch.rand(2, 4, 8, 8) * 2 - 1

    class Oracle(torch.nn.Module):
        latent_channels = 4

        def forward(self, z, timesteps, labels):  # z = (1 - s) x0 + s n  =>  n - x0 = (z - x0) / s
            sigma = (timesteps / 1000).view(-1, 1, 1, 1)
            return (z - target[labels]) / sigma

    config = {"num_train_timesteps": 1000, "shift": 3.0}
    images = sample_images(Oracle(), config, torch.tensor([0, 1]), 8, num_inference_steps=5)
    torch.testing.assert_close(images, PixelCodec().decode(target), atol=1e-5, rtol=1e-5)
