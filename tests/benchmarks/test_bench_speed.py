"""Speed harness: host-sync counting, state bytes, and the timing table's fields."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from emo_bench.speed import (
    Layout,
    SpeedEntry,
    check_targets,
    count_syncs,
    roofline,
    run_speed,
    speed_entries,
    state_bytes,
)
from emo_bench.syncs import count_host_reads
from emo_core import EmoAiry, EmoCats, EmoSens
from emo_core.averaging import FOLD_EVERY, FOLD_RAMP


class ItemSGD(torch.optim.SGD):
    """SGD that reads the gradient norm on the host each step, like a careless optimizer."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad.norm().item() > 1e9:  # one host read per parameter
                    p.grad.zero_()
                if p.grad.abs().max() > 1e9:  # and one implicit bool() per parameter
                    p.grad.zero_()
        return super().step(closure)


def _params(n: int = 3) -> list[Tensor]:
    ps = [torch.nn.Parameter(torch.randn(4, 5)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def _stepper(opt: torch.optim.Optimizer):
    if isinstance(opt, (EmoSens, EmoAiry, EmoCats)):
        return lambda: opt.step(loss=torch.tensor(1.0))
    return opt.step


def test_an_optimizer_calling_item_is_caught() -> None:
    opt = ItemSGD(_params(3), lr=0.1)
    syncs, reads = count_syncs(opt.step, opt, steps=2)
    assert syncs == 6 and reads == 6  # 3 params x (item + bool) per step


def test_patches_are_removed_after_the_block_even_on_error() -> None:
    original = Tensor.item, Tensor.__bool__, Tensor.cpu
    with pytest.raises(RuntimeError, match="boom"), count_host_reads() as seen:
        torch.ones(()).item()
        raise RuntimeError("boom")
    assert (Tensor.item, Tensor.__bool__, Tensor.cpu) == original
    assert seen.reads == 1
    torch.ones(()).item()
    assert seen.reads == 1  # nothing counted outside the block


@pytest.mark.parametrize("cls", [EmoSens, EmoAiry, EmoCats])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_emo_step_makes_no_host_reads(cls: type, foreach: bool | None) -> None:
    opt = cls(_params(), foreach=foreach)
    opt.step(loss=torch.tensor(2.0))  # lazy state init happens outside the count
    syncs, reads = count_syncs(_stepper(opt), opt, steps=3)
    assert (syncs, reads) == (0, 0)


def test_torch_step_counters_are_reads_but_not_syncs() -> None:
    opt = torch.optim.AdamW(_params(3), foreach=True)
    opt.step()
    syncs, reads = count_syncs(opt.step, opt, steps=2)
    assert syncs == 0 and reads > 0  # host-side `step` tensors, by torch's design


def test_torch_adafactor_norm_item_is_counted_as_sync() -> None:
    opt = torch.optim.Adafactor(_params(3), foreach=False)
    opt.step()
    syncs, _ = count_syncs(opt.step, opt, steps=1)
    assert syncs == 6  # param.norm().item() and update.norm().item() per parameter


def test_state_bytes_per_param() -> None:
    params = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    numel = sum(p.numel() for p in params)
    expected = {EmoSens: 8.0, EmoCats: 4.0}  # (v37: no averaged x, no distance sample)
    for cls, want in expected.items():
        opt = cls(params, pulse="v37")
        opt.step(loss=1.0)
        assert state_bytes(opt) / numel == pytest.approx(want, abs=0.01)
    airy = EmoAiry(params, pulse="v37")
    airy.step(loss=1.0)
    assert state_bytes(airy) / numel < 0.1
    adamw = torch.optim.AdamW(params, fused=True)
    adamw.step()
    assert state_bytes(adamw) / numel == pytest.approx(8.0, abs=0.01)


def test_run_speed_reports_documented_fields_with_reference_ratios() -> None:
    layout = Layout("tiny", "tiny", ((16, 8), (8,), (4, 4)))
    entries = [
        SpeedEntry("AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True)),
        SpeedEntry("AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        SpeedEntry("AdamW for-loop", lambda ps: torch.optim.AdamW(ps, foreach=False)),
        SpeedEntry("EmoSens", lambda ps: EmoSens(ps)),
        SpeedEntry("careless", lambda ps: ItemSGD(ps, lr=0.1)),
    ]
    doc = run_speed(
        entries=entries, chosen_layouts=[layout], warmup=1, repeats=2, steps=2, progress=False
    )
    rows = {r["optimizer"]: r for r in doc["results"]}
    assert doc["layouts"] == [{"name": "tiny", "title": "tiny", "params": 152, "tensors": 3}]
    assert rows["AdamW fused"]["ratio_fused"] == 1.0
    assert rows["AdamW foreach"]["ratio_foreach"] == 1.0
    assert rows["AdamW for-loop"]["ratio_forloop"] == 1.0
    assert rows["EmoSens"]["syncs_per_step"] == 0
    assert rows["careless"]["syncs_per_step"] == 6
    for r in rows.values():
        assert r["step_ms"] > 0 and r["step_ms_min"] <= r["step_ms"]
        assert set(r) == {
            "layout",
            "optimizer",
            "step_ms",
            "step_ms_min",
            "ratio_fused",
            "ratio_foreach",
            "ratio_forloop",
            "state_bytes_per_param",
            "syncs_per_step",
            "reads_per_step",
            "first_step_s",
            "timed_from_step",
            "steps_per_block",
        }
        assert r["first_step_s"] > 0


def test_averaged_optimizers_are_timed_at_their_steady_fold_period() -> None:
    """average=True folds every step for its first 63 steps and every 16th from step 512
    (emo_core/averaging.md): timing it from step 5 in blocks of 3 would measure neither the
    steady cost nor one that holds its folds."""
    layout = Layout("tiny", "tiny", ((16, 8),))
    averaged = [e for e in speed_entries() if "average=True" in e.name and "compile" not in e.name]
    assert len(averaged) == 2
    doc = run_speed(
        entries=[SpeedEntry("AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True))]
        + averaged,
        chosen_layouts=[layout],
        warmup=1,
        repeats=2,
        steps=3,
        progress=False,
    )
    rows = {r["optimizer"]: r for r in doc["results"]}
    assert rows["AdamW fused"]["timed_from_step"] == 5
    for entry in averaged:
        assert rows[entry.name]["timed_from_step"] > FOLD_RAMP * FOLD_EVERY
        assert rows[entry.name]["steps_per_block"] == FOLD_EVERY


def test_a_sample_read_every_few_steps_is_timed_over_whole_reads() -> None:
    """On a layout of 160 tensors the distance sample is read every 3rd call: blocks of 4
    steps would hold one read or two by turns, so they are rounded up to 6."""
    layout = Layout("many", "many", ((4, 4),) * 160)
    entry = next(e for e in speed_entries() if e.name == "EmoAiry pulse=distance")
    doc = run_speed(
        entries=[SpeedEntry("AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True)), entry],
        chosen_layouts=[layout],
        warmup=1,
        repeats=2,
        steps=4,
        progress=False,
    )
    rows = {r["optimizer"]: r for r in doc["results"]}
    assert rows["AdamW fused"]["steps_per_block"] == 4
    assert rows[entry.name]["steps_per_block"] == 6


def test_roofline_fraction_is_bound_over_measured_time() -> None:
    """The CUDA-only report, exercised on CPU with a tiny layout."""
    entries = [e for e in speed_entries(quick=True) if e.name in ("AdamW fused", "EmoCats")]
    doc = roofline(torch.device("cpu"), entries, shapes=((64, 64),) * 2, steps=2, copy_mib=4)
    assert doc["params"] == 2 * 64 * 64 and doc["bandwidth_gbs"] > 0
    assert [r["optimizer"] for r in doc["rows"]] == ["AdamW fused", "EmoCats"]
    for r in doc["rows"]:
        bound_ms = r["bytes_per_param"] * doc["params"] / (doc["bandwidth_gbs"] * 1e9) * 1e3
        assert r["roofline_ms"] == pytest.approx(bound_ms)
        assert r["fraction"] == pytest.approx(r["roofline_ms"] / r["step_ms"])


def test_targets_judge_the_default_and_the_compiled_update_separately() -> None:
    def row(name: str, ratio: float) -> dict:
        return {
            "layout": "dense",
            "optimizer": name,
            "ratio_fused": ratio,
            "ratio_foreach": ratio / 3,
            "syncs_per_step": 0,
            "state_bytes_per_param": 4.0,
            "step_ms": 1.0,
        }

    verdicts = {
        t["target"]: t["met"]
        for t in check_targets([row("EmoCats", 3.1), row("EmoCats compile_update", 0.96)])
    }
    assert verdicts["dense: EmoCats ≤ 1.00× AdamW fused"] is False
    assert verdicts["dense: EmoCats compile_update ≤ 1.00× AdamW fused"] is True
    assert verdicts["dense: EmoCats 0 host syncs/step"] is True
