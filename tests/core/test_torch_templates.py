"""Contract tests in the spirit of torch's optimizer test templates (OptimizerInfo), as data
tables: copies (deepcopy, pickle, ``torch.save(opt)``), state-dict hooks, zero-grad no-op,
param groups, older pickles, printing (issue 13, item 4 and the contract tests)."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

from emo_core import EmoSens
from tests.core.cases import (
    NAMES,
    OPTIMIZERS,
    assert_same,
    scripted_losses,
    set_random_grads,
    small_model,
)

# Non-default settings per optimizer: every one must survive a copy.
SETTINGS = {
    "emosens": {
        "min_lr": 2e-6, "max_lr": 5e-4, "sync_loss": False, "log_every": 3, "foreach": False,
        "state_dtype": torch.float64, "maximize": True, "use_shadow": True, "fused": False,
    },
    "emoairy": {
        "min_lr": 3e-6, "max_lr": 2e-3, "sync_loss": False, "stochastic_rounding": False,
        "maximize": True, "clip_threshold": 0.5, "beta2": 0.99,
    },
    "emocats": {
        "min_lr": 1e-5, "max_lr": 1e-4, "foreach": True, "log_every": 2, "betas": (0.8, 0.99),
    },
}  # fmt: skip
ATTRIBUTES = (
    "min_lr", "max_lr", "sync_loss", "process_group", "state_dtype", "stochastic_rounding",
    "foreach", "compile_update", "writer", "log_every", "maximize",
)  # fmt: skip


def _pickle(opt):
    return pickle.loads(pickle.dumps(opt))


def _torch_save(opt):
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickle, "torch_save": _torch_save}


def _train(opt, steps: range) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]
    losses = scripted_losses(steps.stop)
    for step in steps:
        set_random_grads(params, step)
        opt.step(loss=losses[step])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("make_copy", list(COPIES.values()), ids=list(COPIES))
def test_copies_keep_every_setting_and_continue_identically(name: str, make_copy) -> None:
    """Before: the copy lost min_lr, max_lr, sync_loss, ... and its next step raised
    AttributeError."""
    opt = OPTIMIZERS[name](small_model().parameters(), **SETTINGS[name])
    _train(opt, range(4))
    twin = make_copy(opt)
    for attribute in ATTRIBUTES + (("fused",) if name == "emosens" else ()):
        assert getattr(twin, attribute) == getattr(opt, attribute), attribute
    assert_same(twin.state_dict(), opt.state_dict())
    _train(opt, range(4, 8))
    _train(twin, range(4, 8))
    assert_same(twin.state_dict(), opt.state_dict())
    for group, twin_group in zip(opt.param_groups, twin.param_groups):
        for p, q in zip(group["params"], twin_group["params"]):
            assert torch.equal(p, q)


class LockedWriter:
    """A writer holding a lock, like a real SummaryWriter's event thread: not picklable."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.calls += 1


@pytest.mark.parametrize("make_copy", list(COPIES.values()), ids=list(COPIES))
def test_unpicklable_writer_is_dropped_with_a_warning(make_copy) -> None:
    writer = LockedWriter()
    opt = EmoSens(small_model().parameters(), writer=writer)
    _train(opt, range(2))
    logged = writer.calls
    with pytest.warns(UserWarning, match=r"writer=.* cannot be copied or pickled.*writer=None"):
        twin = make_copy(opt)
    assert twin.writer is None and opt.writer is writer and logged > 0
    _train(twin, range(2, 4))  # trains without logging
    assert writer.calls == logged


class Recorder:
    def add_scalar(self, tag: str, value: float, step: int) -> None:
        pass


def test_picklable_writer_is_kept() -> None:
    opt = EmoSens(small_model().parameters(), writer=Recorder())
    assert isinstance(_pickle(opt).writer, Recorder)


_PROCESS_GROUP_SCRIPT = textwrap.dedent(
    """
    import copy, tempfile, warnings
    import torch, torch.distributed as dist
    from emo_core import EmoSens
    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    group = dist.new_group([0])
    opt = EmoSens([torch.zeros(2, requires_grad=True)], process_group=group)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin = copy.deepcopy(opt)
    print("group:", twin.process_group, "warned:", any("process_group" in str(w.message)
          for w in caught))
    dist.destroy_process_group()
    """
)


def test_unpicklable_process_group_becomes_the_default_with_a_warning() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROCESS_GROUP_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert "group: None warned: True" in result.stdout, result.stderr[-2000:]


def test_pickles_of_the_format_1_layout_still_load() -> None:
    """Optimizers pickled when the sensor lived in ``opt.state`` unpickle into the new layout
    (that layout predates the distance controller: v3.7's)."""
    opt = EmoSens(small_model().parameters(), pulse="v37")
    _train(opt, range(3))
    old_layout = {k: v for k, v in opt.__getstate__().items() if k != "emo_state"}
    old_layout["state"] = copy.copy(opt.state)
    old_layout["state"].update(copy.deepcopy(opt.emo_state))
    restored = EmoSens.__new__(EmoSens)
    restored.__setstate__(old_layout)
    assert set(restored.state) == set(opt.state)
    assert restored.telemetry() == opt.telemetry()


# ------------------------------------------------------------- state-dict hooks
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_run_in_torch_order_and_see_the_whole_state(name: str) -> None:
    opt = OPTIMIZERS[name](small_model().parameters())
    _train(opt, range(3))
    calls: list[str] = []

    def pre(optimizer) -> None:
        calls.append("pre")

    def post(optimizer, state_dict: dict) -> dict:
        calls.append("post")
        assert "emo_state" in state_dict["param_groups"][0]  # complete when hooks see it
        return {**state_dict, "note": "added by a post hook"}

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == ["pre", "post"] and sd["note"] == "added by a post hook"

    fresh = OPTIMIZERS[name](small_model().parameters())
    seen: dict[str, object] = {}

    def load_pre(optimizer, state_dict: dict) -> dict:
        calls.append("load_pre")
        fixed = dict(state_dict)
        fixed.pop("note")
        fixed["param_groups"] = copy.deepcopy(state_dict["param_groups"])
        fixed["param_groups"][0]["lr"] = 0.5  # a conversion: checked after the hooks
        return fixed

    def load_post(optimizer) -> None:
        calls.append("load_post")
        seen["telemetry"] = optimizer.telemetry()

    fresh.register_load_state_dict_pre_hook(load_pre)
    fresh.register_load_state_dict_post_hook(load_post)
    sd["param_groups"][0]["lr"] = float("inf")  # invalid unless the pre-hook fixes it
    fresh.load_state_dict(sd)
    assert calls[-2:] == ["load_pre", "load_post"]
    assert seen["telemetry"] == opt.telemetry()  # post-hooks see the loaded sensor
    assert fresh.param_groups[0]["lr"] == 0.5


# ------------------------------------------------------------- zero-grad no-op
NOOP_CASES = [
    ("grads-none", lambda p: None),
    ("grads-zero", torch.zeros_like),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("case", "grad"), NOOP_CASES, ids=[c[0] for c in NOOP_CASES])
def test_step_without_gradient_signal_leaves_parameters_bitwise(name: str, case: str, grad) -> None:
    model = small_model()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params, weight_decay=0.0)
    before = copy.deepcopy(model.state_dict())
    for step in range(3):
        for p in params:
            p.grad = grad(p)
        opt.step(loss=1.0 / (step + 1))
    assert_same(model.state_dict(), before)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------- param groups
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_mid_training_matches_a_separate_optimizer_for_it(name: str) -> None:
    first, second = small_model(), small_model(seed=3)
    # v3.7's one pulse for all groups (the distance controller's is per group)
    opt = OPTIMIZERS[name](first.parameters(), pulse="v37")
    _train(opt, range(3))
    opt.add_param_group({"params": list(second.parameters()), "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5 and "emo_lr" in opt.param_groups[1]
    _train(opt, range(3, 6))
    assert len(opt.get_effective_lr()) == 2
    assert opt.get_effective_lr()[1] == pytest.approx(opt.get_effective_lr()[0] * 0.5)
    moved = [
        not torch.equal(p, q) for p, q in zip(second.parameters(), small_model(3).parameters())
    ]
    assert all(moved)


PARAM_GROUP_ERRORS = [
    (
        "duplicate",
        lambda m: [{"params": [m.lin.weight]}, {"params": [m.lin.weight]}],
        "more than one",
    ),
    ("empty-list", lambda m: [], "empty parameter list"),
    ("not-a-dict", lambda m: [{"params": [m.lin.weight]}, 3], "expected a dict"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("case", "groups", "pattern"), PARAM_GROUP_ERRORS, ids=[c[0] for c in PARAM_GROUP_ERRORS]
)
def test_bad_param_groups_raise(name: str, case: str, groups, pattern: str) -> None:
    model = small_model()
    with pytest.raises((ValueError, TypeError), match=pattern):
        OPTIMIZERS[name](groups(model))


@pytest.mark.parametrize("name", NAMES)
def test_empty_param_group_round_trips_through_a_state_dict(name: str) -> None:
    model = small_model()
    opt = OPTIMIZERS[name]([{"params": list(model.parameters())}, {"params": []}])
    _train(opt, range(3))
    fresh = OPTIMIZERS[name]([{"params": list(small_model().parameters())}, {"params": []}])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.telemetry() == opt.telemetry()


# -------------------------------------------------------------------- printing
@pytest.mark.parametrize("name", NAMES)
def test_repr_lists_the_class_and_each_groups_hyperparameters(name: str) -> None:
    opt = OPTIMIZERS[name]([{"params": [torch.zeros(2, requires_grad=True)]},
                            {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5}])  # fmt: skip
    text = repr(opt)
    cls = OPTIMIZERS[name].__name__
    assert text.startswith(f"{cls} (") and "Parameter Group 1" in text
    weight_decay = 0.0 if name == "emosens" else 0.01  # (EmoSens's None: 0 when averaged)
    assert "lr: 0.5" in text and f"weight_decay: {weight_decay}" in text
    _train(opt, range(2))
    assert repr(opt).startswith(f"{cls} (")  # still prints after steps


@pytest.mark.parametrize("name", NAMES)
def test_dcp_state_creating_step_is_silent_and_changes_no_parameter(name: str) -> None:
    """torch.distributed.checkpoint creates lazy state with a zero-grad step at lr 0 (no
    loss): it needs no 'received no loss' warning, and a real missing loss still warns."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = small_model()
    before = copy.deepcopy(model.state_dict())
    opt = OPTIMIZERS[name](model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _init_optim_state(opt)
    assert all(opt.state[p] for p in model.parameters())
    assert_same(model.state_dict(), before)
    set_random_grads(list(model.parameters()), 0)
    with pytest.warns(UserWarning, match="received no loss"):
        opt.step()


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_dcp_state_dict_helpers_resume_the_distance_controller_in_one_process(
    tmp_path, name: str, average: bool
) -> None:
    """get_state_dict's template of a fresh optimizer (after its state-creating step, which
    has no loss) lacked the distance controller's entry, so dcp.load dropped the saved one
    and set_state_dict refused the checkpoint as "saved with pulse='v37'" (in one process;
    under world size > 1 the step's collective created it)."""
    if average and name == "emoairy":
        pytest.skip("EmoAiry has no average=True")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = small_model()
        options = {"average": True} if average else {}
        return model, OPTIMIZERS[name](model.parameters(), pulse="distance", **options)

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            set_random_grads(list(model.parameters()), step)
            opt.step(loss=scripted_losses(8)[step])

    model, opt = make()
    train(model, opt, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    train(model, opt, range(3, 6))

    resumed, resumed_opt = make()
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)  # the template
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(
        resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    train(resumed, resumed_opt, range(3, 6))
    assert_same(resumed.state_dict(), model.state_dict())
    assert resumed_opt.telemetry() == opt.telemetry()
