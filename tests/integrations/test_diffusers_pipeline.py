"""The pretrained-base pipeline of emo_diffusers: pretrain once (cached), LoRA on new classes,
measure with the sample classifier; --optimizer_args; one-line errors for bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from emo_diffusers.conditioning import load_conditioner  # noqa: E402
from emo_diffusers.data import PixelCodec, load_images  # noqa: E402
from emo_diffusers.evaluation import evaluate_samples  # noqa: E402
from emo_diffusers.models import TINY_CONFIGS, FlowModel, load_transformer  # noqa: E402
from emo_diffusers.pretraining import PretrainSpec, ensure_pretrained_base  # noqa: E402
from emo_diffusers.sampling import sample_images  # noqa: E402
from emo_diffusers.train_lora_flow import _cli, build_training, main, parse_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SD3_CONFIG = ROOT / "configs" / "diffusers" / "tiny_sd3_lora.yaml"
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _quick(out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--config", str(SD3_CONFIG), "--output_dir", str(out), "--cache_dir", str(cache),
        "--report_to", "none", "--disable_progress_bar", "--checkpointing_steps", "0", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------ the whole pipeline
def test_shipped_config_pretrains_once_and_lora_learns_the_new_digits(tmp_path: Path) -> None:
    """The shipped SD3 pipeline, shortened: the LoRA's samples of 5-9 beat the base's."""
    cache = tmp_path / "cache"
    short = ("--pretrain_steps", "800", "--max_train_steps", "200")
    argv = _quick(tmp_path / "run", cache, *short, "--eval_samples_per_class", "10")
    argv += ["--num_inference_steps", "10"]
    metrics = main(argv)

    assert metrics["pretrained_here"] and metrics["pretrain_classes"] == list("01234")
    assert metrics["train_classes"] == list("56789")
    assert metrics["classifier_heldout_accuracy"] >= 0.9  # a judge worth its verdicts
    for key in ("sample_accuracy_base", "sample_accuracy_lora"):
        assert 0.0 <= metrics[key] <= 1.0
    # The base never saw 5-9; 200 bf16 EmoSens steps of LoRA teach them.
    assert metrics["sample_accuracy_base"] <= 0.3
    assert metrics["sample_accuracy_lora"] >= metrics["sample_accuracy_base"] + 0.3
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["sample_accuracy_lora"] == metrics["sample_accuracy_lora"]
    assert saved["wall_time_s"] > saved["train_seconds"] > 0
    assert saved["optimizer_state_bytes"] > 0 and saved["mixed_precision"] == "bf16"

    # Same settings: the cached base and classifier are reused (not rebuilt, same verdicts).
    base = Path(metrics["base"])
    stamp = (base / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = main(_quick(tmp_path / "again", cache, *short, "--max_train_steps", "1"))
    assert not again["pretrained_here"] and again["base"] == str(base)
    assert (base / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert again["classifier_heldout_accuracy"] == metrics["classifier_heldout_accuracy"]
    assert len(list(cache.glob("judge-*.safetensors"))) == 1


def test_base_cache_is_keyed_by_its_settings(tmp_path: Path) -> None:
    images = load_images(16, 1)
    latents = PixelCodec().encode(images.images)[:64]
    labels = images.labels[:64]
    spec = PretrainSpec(
        model_type="sd3", transformer_config=TINY_CONFIGS["sd3"], num_classes=10,
        num_tokens=4, classes=(0, 1), steps=2, learning_rate=1e-3, batch_size=4, seed=0,
        scheduler_shift=3.0,
    )  # fmt: skip
    quiet = {"log": lambda _: None}
    first, built = ensure_pretrained_base(spec, latents, labels, tmp_path, **quiet)
    assert built and (first / "config.json").is_file()
    assert (first / "class_conditioner.safetensors").is_file()
    assert ensure_pretrained_base(spec, latents, labels, tmp_path, **quiet) == (first, False)
    other = PretrainSpec(**{**spec.__dict__, "steps": 3})
    second, built = ensure_pretrained_base(other, latents, labels, tmp_path, **quiet)
    assert built and second != first
    with pytest.raises(ValueError, match=r"base_model_dir.*other settings \(steps\)"):
        ensure_pretrained_base(other, latents, labels, tmp_path, directory=first, **quiet)
    assert not list(tmp_path.glob("*.tmp-*"))  # staging folders renamed away


def test_base_samples_come_from_the_base_without_lora(tmp_path: Path) -> None:
    """evaluate_samples' "base" column is the model on disk, whatever the LoRA learned."""
    argv = _quick(tmp_path / "out", tmp_path / "cache", "--pretrain_steps", "2")
    setup = build_training(parse_args([*argv, "--pretrain_batch_size", "4"]))
    model = setup.accelerator.unwrap_model(setup.model)
    with torch.no_grad():  # pretend training moved the adapter and the class prompts
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("conditioner."):
                p.add_(0.5)
    classes = [5, 9]
    result = evaluate_samples(
        model, setup.base_conditioner, classes, SCHEDULER, 8,
        samples_per_class=2, num_inference_steps=3, seed=1,
    )  # fmt: skip
    base_dir = Path(setup.base_info["base"])
    _, transformer = load_transformer(base_dir, torch.bfloat16)
    fresh = FlowModel(transformer, load_conditioner(base_dir).to(torch.bfloat16), "sd3")
    labels = torch.tensor(classes).repeat(2)
    expected = sample_images(fresh, SCHEDULER, labels, 8, num_inference_steps=3, seed=1)
    assert torch.equal(result["base"], expected)
    assert not torch.equal(result["lora"], expected)
    # Afterwards the model is base + LoRA again, trained class prompts included.
    after = sample_images(model, SCHEDULER, labels, 8, num_inference_steps=3, seed=1)
    assert torch.equal(after, result["lora"])


# ---------------------------------------------------------------------- optimizer_args
@pytest.mark.parametrize(
    ("optimizer", "entries", "check"),
    [
        ("emosens", ["max_lr=3e-3", "use_shadow=True"],
         lambda opt: opt.max_lr == 3e-3 and opt.param_groups[0]["use_shadow"] is True),
        ("adamw", ["betas=0.8,0.9", "amsgrad=True"],
         lambda opt: opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["amsgrad"]),
        ("prodigy", ["d_coef=2", "safeguard_warmup=False"],
         lambda opt: opt.param_groups[0]["d_coef"] == 2.0
         and opt.param_groups[0]["safeguard_warmup"] is False),
    ],
)  # fmt: skip
def test_optimizer_args_reach_every_optimizer(tmp_path, optimizer, entries, check) -> None:
    argv = _quick(tmp_path, tmp_path / "cache", "--pretrain_steps", "0", "--optimizer", optimizer)
    setup = build_training(parse_args([*argv, "--optimizer_args", *entries]))
    inner = getattr(setup.optimizer, "optimizer", setup.optimizer)
    assert check(inner)


def test_optimizer_args_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(SD3_CONFIG.read_text() + "\noptimizer_args: {max_lr: 2.0e-3}\n")
    args = parse_args(["--config", str(config)])
    assert args.optimizer_args == {"max_lr": 2.0e-3}
    args = parse_args(["--config", str(config), "--optimizer_args", "max_lr=5e-3"])  # CLI wins
    assert args.optimizer_args == ["max_lr=5e-3"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["max_lrr=3e-3"], "key 'max_lrr' for EmoSens (did you mean 'max_lr'?)"),
        (["use_shadow=1"], "value use_shadow='1' for EmoSens: expected bool"),
        (["lr=2"], "key 'lr' for EmoSens: use --learning_rate"),
        (["max_lr"], "entry 'max_lr': expected key=value"),
    ],
)
def test_bad_optimizer_args_name_the_key(capsys, entries, message) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--optimizer_args", *entries])
    assert f"Invalid optimizer_args {message}" in capsys.readouterr().err


# ------------------------------------------------------------------------- bad folders
def test_bad_data_folders_are_one_line_errors(tmp_path, monkeypatch, capsys, caplog) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (8, 8), 255).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    with caplog.at_level("WARNING"):
        images = load_images(8, 1, folder)
    assert len(images) == 1 and "Skipping unreadable image" in caplog.text
    (folder / "good.png").unlink()

    for data_dir, message in (
        (folder, "no readable images (.png"),
        (tmp_path / "missing", "is not a directory"),
    ):
        argv = ["train_lora_flow", "--train_data_dir", str(data_dir), "--pretrain_steps", "0"]
        monkeypatch.setattr(sys, "argv", [*argv, "--output_dir", str(tmp_path / "o")])
        with pytest.raises(SystemExit) as exit_info:
            _cli()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err)
