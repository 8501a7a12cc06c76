"""step() never reads a device value on the host (SPEC §5)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from tests.core.cases import (
    ALL_IMPLS,
    OPTIMIZERS,
    fresh_compile_cache,
    impl_id,
    scripted_losses,
    set_random_grads,
    small_model,
)

SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Count calls of the Tensor methods that copy a value to the host during a step.

    Reads made by the compiler itself are left out: Inductor's constant folding reads the
    uniform constants of a graph it is compiling (``constant_fold_uniform_value``), once per
    compile and only on a cold compile cache, never in a compiled step that runs.
    """
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name: str):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if not torch.compiler.is_compiling():
                counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, wrap(name))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_counter_catches_an_item_call() -> None:
    with count_host_reads() as counts:
        torch.ones(()).item()
        bool(torch.ones(()))
    assert counts["item"] == 1 and counts["__bool__"] == 1


@pytest.mark.parametrize("use_shadow", [False, True], ids=["plain", "shadow"])
@pytest.mark.parametrize("case", ALL_IMPLS + [(n, {}) for n in OPTIMIZERS], ids=impl_id)
def test_step_makes_no_host_reads(case: tuple[str, dict], use_shadow: bool) -> None:
    name, impl = case
    fresh_compile_cache(impl)
    model = small_model()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params, use_shadow=use_shadow, **impl)
    losses = scripted_losses(6)
    for step, loss in enumerate(losses):
        set_random_grads(params, step)
        loss_tensor = torch.tensor(loss, requires_grad=True) * 1.0
        with count_host_reads() as counts:
            if step % 2:
                opt.add_loss(loss_tensor)
                opt.step()
            else:
                opt.step(loss=loss_tensor)
        assert sum(counts.values()) == 0, dict(counts)


def test_step_with_closure_makes_no_host_reads() -> None:
    model = small_model()
    opt = OPTIMIZERS["emosens"](model.parameters())
    x = torch.randn(4, 6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model["lin"](x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        with count_host_reads() as counts:
            opt.step(closure)
        assert sum(counts.values()) == 0, dict(counts)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_step_does_not_synchronize(name: str) -> None:
    model = small_model().cuda()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params, use_shadow=True)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        loss = torch.tensor(1.0 / (step + 1), device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(loss=loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
