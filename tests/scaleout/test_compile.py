"""``torch.compile`` of a training step that calls ``opt.step()`` (SPEC §5).

The effective LR is a 0-dim tensor, so the compiled step must not break its graph inside the
optimizer and must not recompile while the LR moves. The dynamo-level checks run with the
``eager`` backend (fast, no C++ toolchain); one test runs the real inductor backend.
"""

from __future__ import annotations

import linecache
import shutil
from collections.abc import Callable

import pytest
import torch
import torch._dynamo as dynamo
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

from emo_core import EmoAiry, EmoCats, EmoSens

OPTIMIZERS = {"emosens": EmoSens, "emoairy": EmoAiry, "emocats": EmoCats}
# Multipliers on the real loss: the spikes make emoPulse move the LR (checked below).
LOSS_SCALES = [1.0, 0.9, 0.8, 3.0, 0.7, 0.65, 0.6, 0.58, 0.57, 0.5, 2.0, 0.4]
WARMUP_CALLS = 2  # dynamo adds group["capturable"] on its first optimizer trace: 1 recompile


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    dynamo.reset()
    yield
    dynamo.reset()


def _make(name: str, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return model, OPTIMIZERS[name](model.parameters(), **kwargs)


def _step_fn(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[Tensor], Tensor]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)

    def train_step(scale: Tensor) -> Tensor:
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss * scale)
        opt.zero_grad()
        return loss.detach()

    return train_step


def _breaks_inside_emo_core(step: Callable[[Tensor], Tensor]) -> list[str]:
    """Graph-break reasons whose stack passes through emo_core (backward etc. break outside)."""
    explanation = dynamo.explain(step)(torch.tensor(1.0))
    return [
        reason.reason.splitlines()[0]
        for reason in explanation.break_reasons
        if any("emo_core" in frame.filename for frame in reason.user_stack)
    ]


def _run(name: str, backend: str, **kwargs) -> dict:
    """Train compiled and eager twins on the same losses; count compiled frames."""
    model, opt = _make(name, **kwargs)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_step_fn(model, opt), backend=counter)
    twin_model, twin_opt = _make(name, **kwargs)
    eager = _step_fn(twin_model, twin_opt)
    lrs, frames_after_warmup = [], None
    for index, scale in enumerate(LOSS_SCALES):
        compiled(torch.tensor(scale))
        eager(torch.tensor(scale))
        lrs.append(opt.get_effective_lr()[0])  # reads the tensor LR outside the compiled step
        if index + 1 == WARMUP_CALLS:
            frames_after_warmup = counter.frame_count
    diff = max(
        (p - q).abs().max().item() for p, q in zip(model.parameters(), twin_model.parameters())
    )
    return {
        "frames_after_warmup": frames_after_warmup,
        "frames": counter.frame_count,
        "lrs": lrs,
        "twin_lrs": [twin_opt.get_effective_lr()[0]],
        "diff": diff,
        "moved": max(
            (p - q).abs().max().item()
            for p, q in zip(model.parameters(), _make(name)[0].parameters())
        ),
    }


@pytest.mark.parametrize("pulse", ["v37", "distance"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_graph_breaks_inside_the_optimizer(name: str, pulse: str) -> None:
    kwargs = {} if name == "emoairy" else {"average": False}
    model, opt = _make(name, pulse=pulse, **kwargs)
    assert _breaks_inside_emo_core(_step_fn(model, opt)) == []


@pytest.mark.parametrize("name", ["emosens", "emocats"])
def test_averaging_breaks_the_graph_once_for_its_host_call_count(name: str) -> None:
    """Under the averaged default the fold schedule comes from a host count of step calls
    (``_count_call``, kept out of the graph: a Python int in the graph would recompile on
    every step); that is the one break inside emo_core, per step."""
    model, opt = _make(name)
    assert opt.average
    explanation = dynamo.explain(_step_fn(model, opt))(torch.tensor(1.0))
    lines = [  # the innermost frame of each break inside emo_core: the line that broke
        linecache.getline(reason.user_stack[-1].filename, reason.user_stack[-1].lineno)
        for reason in explanation.break_reasons
        if any("emo_core" in frame.filename for frame in reason.user_stack)
    ]
    assert lines and all("self._count_call(" in line for line in lines), lines


def test_graph_break_detection_sees_breaks_inside_emo_core() -> None:
    """Control: a writer reads values on the host by design, which breaks inside emo_core."""

    class Recorder:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            pass

    model, opt = _make("emosens", writer=Recorder())
    assert _breaks_inside_emo_core(_step_fn(model, opt))


@pytest.mark.parametrize("pulse", ["v37", "distance"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_recompiles_while_the_effective_lr_changes(name: str, pulse: str) -> None:
    result = _run(name, "eager", pulse=pulse)
    after_warmup = result["lrs"][WARMUP_CALLS:]
    assert len({round(lr, 12) for lr in after_warmup}) >= 3, "the LR should move in this test"
    assert result["frames"] == result["frames_after_warmup"], "recompiled as the LR changed"
    # distance: the LR starts at D0 (and EmoSens's and EmoCats's growth limit keeps the k-th
    # step's LR <= D0·1.2^k, ~1e-5 by the 12th)
    assert result["moved"] > (1e-4 if pulse == "v37" else 1e-5)
    assert result["diff"] <= 1e-6 * (1.0 if pulse == "v37" else 0.1), "compiled != eager"


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return shutil.which(get_cpp_compiler())
    except Exception:  # no toolchain, or inductor internals moved
        return None


@pytest.mark.skipif(_cpp_compiler() is None, reason="inductor needs a C++ compiler (g++/clang++)")
def test_inductor_compiled_training_step_matches_eager() -> None:
    """EmoSens: the default fp32 path (fused kernel in eager) compiles with inductor."""
    result = _run("emosens", "inductor")
    assert result["frames"] == result["frames_after_warmup"]
    assert result["moved"] > 1e-5  # (the default pulse="distance": from D0, as above)
    assert result["diff"] <= 1e-6


@pytest.mark.skipif(_cpp_compiler() is None, reason="inductor needs a C++ compiler (g++/clang++)")
def test_inductor_compiled_first_step_gives_each_parameter_its_own_state() -> None:
    """EmoAiry's per-tensor loop (foreach=False; also what compile_update=True traces inside
    a compiled step): its first compiled call creates each parameter's 0-dim "step" and adds
    1 to it; inductor merged those identical computations into one buffer, so all parameters
    shared one counter, advanced once per parameter (11 after 3 steps of 5 tensors), and the
    bias correction and the parameters went wrong (1e-2 relative after 12 steps)."""
    result = _run("emoairy", "inductor", foreach=False)
    assert result["moved"] > 1e-4
    assert result["diff"] <= 1e-6, "compiled != eager"
    model, opt = _make("emoairy", foreach=False)
    compiled = torch.compile(_step_fn(model, opt))
    for scale in LOSS_SCALES[:3]:
        compiled(torch.tensor(scale))
    steps = [opt.state[p]["step"] for p in model.parameters()]
    assert len({s.untyped_storage().data_ptr() for s in steps}) == len(steps)
    assert [float(s) for s in steps] == [3.0] * len(steps)


def _many_tensors(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """66 tensors: the distance sample is read every 2nd call (distance.md)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), *(nn.Linear(4, 4) for _ in range(32)))
    return model, OPTIMIZERS[name](model.parameters())


def test_a_sample_read_every_few_calls_compiles_and_matches_eager() -> None:
    """EmoAiry's default (no averaging) on a model whose sample is read every 2nd call (when
    to read comes from the host count of calls, ``_count_call``, kept out of the graph): the
    compiled steps, on reads and between them, match eager ones."""
    model, opt = _many_tensors("emoairy")
    twin_model, twin_opt = _many_tensors("emoairy")
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(_many_step(model, opt), backend=counter)
    eager = _many_step(twin_model, twin_opt)
    for scale in LOSS_SCALES[:5]:
        compiled(torch.tensor(scale))
        eager(torch.tensor(scale))
    diff = max(
        (p - q).abs().max().item() for p, q in zip(model.parameters(), twin_model.parameters())
    )
    assert diff <= 1e-7
    assert opt.get_effective_lr() == pytest.approx(twin_opt.get_effective_lr(), rel=1e-6)
    assert opt.emo_state["emo_distance"]["num"][0] > 0
    assert opt._plan["plan"].period == 2
    assert counter.frame_count > 0, "nothing was compiled"


def _many_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[Tensor], Tensor]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)

    def train_step(scale: Tensor) -> Tensor:
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss * scale)
        opt.zero_grad()
        return loss.detach()

    return train_step
