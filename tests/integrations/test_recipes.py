"""integrations/recipes: the tiny pipelines load through the real from_pretrained path, and the
offline launcher runs a script unmodified, offline, with its argv, tracing the applied LR."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

RECIPES = Path(__file__).resolve().parents[2] / "integrations" / "recipes"
sys.path.insert(0, str(RECIPES))

import tiny_models  # noqa: E402


def _one_step_latents(pipe, prompt: str) -> torch.Tensor:
    out = pipe(
        prompt,
        num_inference_steps=1,
        height=tiny_models.IMAGE_SIZE,
        width=tiny_models.IMAGE_SIZE,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


def test_tiny_sd15_loads_with_from_pretrained_and_denoises(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    saved = tiny_models.build_tiny_sd15(tmp_path / "sd15")
    pipe = StableDiffusionPipeline.from_pretrained(saved, safety_checker=None)
    latents = _one_step_latents(pipe, "a photo of handwritten digit 3")
    assert latents.shape == (1, tiny_models.LATENT_CHANNELS, 8, 8)
    assert torch.isfinite(latents).all()
    # sd-scripts reads its tokenizer from --tokenizer_cache_dir/<name>: same vocabulary.
    cached = CLIPTokenizer.from_pretrained(
        saved / "tokenizer_cache" / tiny_models.KOHYA_TOKENIZER_NAME
    )
    assert cached.model_max_length == 77
    assert cached("digit 3").input_ids == pipe.tokenizer("digit 3").input_ids
    assert len(cached) == pipe.text_encoder.config.vocab_size


def test_tiny_sd3_loads_with_from_pretrained_and_denoises(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    saved = tiny_models.build_tiny_sd3(tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(saved)
    assert pipe.vae.config.shift_factor is not None  # the SD3 scripts subtract it
    latents = _one_step_latents(pipe, "a photo of sks digit")
    assert latents.shape == (1, tiny_models.LATENT_CHANNELS, 8, 8)
    assert torch.isfinite(latents).all()
    ids = pipe.tokenizer_3("a photo of sks digit").input_ids
    assert pipe.tokenizer_3.unk_token_id not in ids


def test_launcher_runs_script_offline_with_its_argv_and_traces_lr(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import json, os, sys, torch\n"
        "w = torch.nn.Parameter(torch.ones(2))\n"
        "opt = torch.optim.SGD([w], lr=float(sys.argv[2]))\n"
        "for _ in range(3):\n"
        "    (w ** 2).sum().backward(); opt.step(); opt.zero_grad()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'name': __name__,\n"
        "                  'offline': os.environ.get('HF_HUB_OFFLINE')}))\n"
    )
    trace = tmp_path / "trace.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            str(RECIPES / "run_offline.py"),
            "--trace",
            str(trace),
            str(script),
            "--lr",
            "0.25",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"argv": ["--lr", "0.25"], "name": "__main__", "offline": "1"}
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["optimizer"] == "SGD" and s["lr"] == [0.25] for s in steps)


def test_launcher_trace_shows_capture_feeding_an_unmodified_loop(tmp_path: Path) -> None:
    """A loop that never passes the loss to step(): without capture the trace shows no loss
    reaching the optimizer; with capture_loss=True, every step's."""
    script = tmp_path / "train.py"
    script.write_text(
        "import torch, emo_core\n"
        "torch.manual_seed(0)\n"
        "x, y = torch.randn(16, 4), torch.randn(16, 1)\n"
        "for capture in (False, True):\n"
        "    model = torch.nn.Linear(4, 1)\n"
        "    opt = emo_core.EmoSens(model.parameters(), capture_loss=capture)\n"
        "    for _ in range(4):\n"
        "        torch.nn.functional.mse_loss(model(x), y).backward()\n"
        "        opt.step()\n"
        "        opt.zero_grad()\n"
        "    opt.close()\n"
    )
    trace = tmp_path / "trace.jsonl"
    done = subprocess.run(
        [sys.executable, str(RECIPES / "run_offline.py"), "--trace", str(trace), str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "received no loss" in done.stderr  # the uncaptured run warns
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert all(s["optimizer"] == "EmoSens" and len(s["emo_lr"]) == 1 for s in steps)
    assert [s["sensed_steps"] for s in steps] == [0, 0, 0, 0, 1, 2, 3, 4]


def test_launcher_rejects_a_missing_script(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(RECIPES / "run_offline.py"), str(tmp_path / "absent.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "script not found" in done.stderr and "absent.py" in done.stderr
