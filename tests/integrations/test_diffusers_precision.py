"""Why stochastic rounding matters for bf16 LoRA training (the emo_diffusers showcase).

A warm-started peft LoRA adapter in bf16 (up-projection entries in [1, 2), where bf16's
spacing is 2**-7) gets a small correction to learn. Emo's v3.7 step is at most ~1e-3, below half
the spacing (~3.9e-3): rounded to nearest, every update is lost and the adapter never
changes (plain AdamW at 1e-4 the same). Rounded stochastically, updates survive in
expectation and the bf16 adapter learns almost as well as an fp32 one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from emo_core import EmoSens  # noqa: E402

STEPS = 200


def _warm_lora(dtype: torch.dtype) -> tuple[nn.Module, nn.Parameter, torch.Tensor, torch.Tensor]:
    """A linear layer with a trained-looking LoRA, inputs, and targets of a corrected adapter."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(16, 16, bias=False))
    model = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["proj"]), model
    )
    lora_a = model.proj.lora_A["default"].weight
    lora_b = model.proj.lora_B["default"].weight
    with torch.no_grad():
        model.proj.base_layer.weight.copy_(torch.randn(16, 16, generator=g) / 4)
        lora_a.copy_(torch.randn(lora_a.shape, generator=g) / 4)
        lora_b.copy_(1.0 + torch.rand(lora_b.shape, generator=g))  # entries in [1, 2)
        x = torch.randn(64, 16, generator=g)
        correction = 0.05 * torch.randn(lora_b.shape, generator=g)
        y = model(x) + x @ lora_a.T @ correction.T
    model.requires_grad_(False)
    lora_b.requires_grad_(True)  # train the up-projection only
    model.to(dtype)
    return model, lora_b, x.to(dtype), y.to(dtype)


def _train(dtype: torch.dtype, make_optimizer) -> tuple[list[float], bool]:
    model, lora_b, x, y = _warm_lora(dtype)
    start = lora_b.detach().clone()
    optimizer = make_optimizer([lora_b])
    losses = []
    for _ in range(STEPS):
        loss = (model(x).float() - y.float()).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        optimizer.step(**({"loss": loss} if isinstance(optimizer, EmoSens) else {}))
        optimizer.zero_grad()
    assert lora_b.dtype == dtype
    return losses, torch.equal(lora_b, start)


def _emosens(stochastic_rounding: bool | None):
    def make(params):
        # v3.7's pulse, capped at max_lr = 1e-3: below half a bf16 step here (the scale-finding
        # default takes larger steps; tests/core/test_precision.py covers its rounding)
        return EmoSens(
            params, weight_decay=0.0, stochastic_rounding=stochastic_rounding, pulse="v37"
        )

    return make


def test_bf16_round_to_nearest_stalls_and_stochastic_rounding_learns() -> None:
    fp32_losses, _ = _train(torch.float32, _emosens(None))
    nearest_losses, nearest_unchanged = _train(torch.bfloat16, _emosens(False))
    adamw_losses, adamw_unchanged = _train(
        torch.bfloat16, lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0)
    )
    sr_losses, sr_unchanged = _train(torch.bfloat16, _emosens(True))

    # Round to nearest: every update is below half a bf16 step, the adapter is frozen.
    assert nearest_unchanged and adamw_unchanged
    assert nearest_losses[-1] == nearest_losses[0] == adamw_losses[-1]
    # Stochastic rounding: the bf16 adapter learns, close to the fp32 run.
    assert not sr_unchanged
    assert sr_losses[-1] < 0.25 * sr_losses[0]
    assert fp32_losses[-1] < 0.25 * fp32_losses[0]
    assert sr_losses[-1] < 2.5 * fp32_losses[-1]
