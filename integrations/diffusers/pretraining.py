"""A pretrained base, made here once: the tiny transformer trained fully on some classes.

LoRA adapts a *pretrained* model to something new; a random-init base teaches nothing. So
without ``--pretrained_model_name_or_path`` the script first trains the whole tiny
transformer and its class conditioner (fp32, AdamW, warm-up + cosine decay, flow matching as
in ``flow_matching``) on ``--pretrain_classes`` only (digits 0-4 by default), and writes it
with ``save_pretrained`` to ``<cache_dir>/base-<model_type>-<key>/``:

* ``config.json`` + ``diffusion_pytorch_model.safetensors``: the transformer, read back with
  ``from_pretrained`` like any local diffusers model;
* ``class_conditioner.safetensors``: the class "prompts" (rows of the classes it never saw
  stay at their seeded init, as new tokens would);
* ``pretraining.json``: the spec it was built from and its loss.

``<key>`` hashes that spec (model config, seeds, steps, data fingerprint, ...): a changed
config builds a new base, an unchanged one is reused. The folder is written under a temporary
name and renamed, so an interrupted build never leaves a half base behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .conditioning import ClassConditioner, save_conditioner
from .flow_matching import (
    add_noise,
    flow_matching_loss,
    loss_weighting,
    sample_density,
    sigmas_from_density,
    velocity_target,
)
from .models import FlowModel, _model_class

__all__ = [
    "PRETRAIN_INFO",
    "PretrainSpec",
    "data_fingerprint",
    "default_cache_dir",
    "ensure_pretrained_base",
]

PRETRAIN_INFO = "pretraining.json"
_FORMAT = 1  # bump when the pretraining recipe changes, so old caches are not reused


def default_cache_dir() -> Path:
    """``$EMO_DIFFUSERS_CACHE``, else ``$XDG_CACHE_HOME/emo_diffusers`` (``~/.cache/...``)."""
    if os.environ.get("EMO_DIFFUSERS_CACHE"):
        return Path(os.environ["EMO_DIFFUSERS_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "emo_diffusers"


def data_fingerprint(*tensors: Tensor) -> str:
    """A short hash of tensors' bytes: the cache key changes when the training data does."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PretrainSpec:
    """Everything the pretrained base depends on (hashed into its cache key)."""

    model_type: str
    transformer_config: dict[str, Any]
    num_classes: int
    num_tokens: int
    classes: tuple[int, ...]  # label indices the base is trained on
    steps: int
    learning_rate: float
    batch_size: int
    seed: int
    scheduler_shift: float
    weighting: dict[str, Any] = field(default_factory=dict)
    data: str = ""  # data_fingerprint of the images and labels

    def key(self) -> str:
        text = json.dumps({"format": _FORMAT, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=list))


def ensure_pretrained_base(
    spec: PretrainSpec,
    latents: Tensor,
    labels: Tensor,
    cache_dir: str | Path,
    directory: str | Path | None = None,
    log=print,
    progress: bool = False,
) -> tuple[Path, bool]:
    """``(base directory, built now?)``: reuse the cached base of ``spec`` or pretrain it.

    ``directory`` overrides ``<cache_dir>/base-<model_type>-<key>``; a directory holding a
    base of another spec is an error (never a silent reuse).
    """
    target = (
        Path(directory) if directory else Path(cache_dir) / f"base-{spec.model_type}-{spec.key()}"
    )
    info_file = target / PRETRAIN_INFO
    if info_file.is_file():
        saved = json.loads(info_file.read_text()).get("spec", {})
        different = sorted(k for k, v in spec.to_json().items() if saved.get(k) != v)
        if different:
            raise ValueError(
                f"Invalid base_model_dir: {str(target)!r} holds a base pretrained with other "
                f"settings ({', '.join(different)}); delete it or pass another --base_model_dir"
            )
        return target, False
    if target.exists() and any(target.iterdir()):
        raise ValueError(
            f"Invalid base_model_dir: {str(target)!r} exists but has no {PRETRAIN_INFO}; "
            "delete it or pass another --base_model_dir"
        )
    log(
        f"Pretraining the {spec.model_type} base on classes {list(spec.classes)} "
        f"({spec.steps} steps, once) -> {target}"
    )
    start = time.perf_counter()
    model, losses = pretrain(spec, latents, labels, progress=progress)
    seconds = time.perf_counter() - start
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.transformer.save_pretrained(staging)
    save_conditioner(model.conditioner, staging)
    tail = losses[-50:]
    info = {
        "spec": spec.to_json(),
        "final_loss": sum(tail) / max(len(tail), 1),
        "seconds": seconds,
    }
    (staging / PRETRAIN_INFO).write_text(json.dumps(info, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    log(f"Pretrained base saved to {target} ({seconds:.0f} s, final loss {info['final_loss']:.4f})")
    return target, True


def pretrain(
    spec: PretrainSpec, latents: Tensor, labels: Tensor, progress: bool = False
) -> tuple[FlowModel, list[float]]:
    """Train a seeded transformer + conditioner on ``spec.classes`` (fp32); returns it and losses."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tqdm.auto import tqdm

    keep = torch.isin(labels, torch.tensor(spec.classes, device=labels.device))
    x_all, y_all = latents[keep].float(), labels[keep]
    if len(y_all) == 0:
        raise ValueError(
            f"Invalid pretrain_classes: no training images of classes {list(spec.classes)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = _model_class(spec.model_type)(**spec.transformer_config)
        cfg = transformer.config
        conditioner = ClassConditioner(
            spec.num_classes, spec.num_tokens, cfg.joint_attention_dim, cfg.pooled_projection_dim
        )
    model = FlowModel(transformer, conditioner, spec.model_type).to(latents.device).train()
    sigmas = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=spec.scheduler_shift
    ).sigmas.to(latents.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    warmup = max(1, spec.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / spec.steps)),
    )
    generator = torch.Generator(device=latents.device).manual_seed(spec.seed)
    weighting = {"weighting_scheme": "logit_normal", **spec.weighting}
    scheme = weighting.pop("weighting_scheme")
    losses: list[float] = []
    for _ in tqdm(
        range(spec.steps), desc=f"pretraining {spec.model_type} base", disable=not progress
    ):
        index = torch.randint(
            len(y_all), (spec.batch_size,), generator=generator, device=y_all.device
        )
        x0, y = x_all[index], y_all[index]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        u = sample_density(scheme, x0.shape[0], generator=generator, device=x0.device, **weighting)
        s, t = sigmas_from_density(u, sigmas, 1000)
        prediction = model(add_noise(x0, noise, s), t, y)
        loss = flow_matching_loss(prediction, velocity_target(x0, noise), loss_weighting(scheme, s))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return model.eval(), [float(v) for v in losses]
