"""Quality harness: every workload trains with every optimizer; divergence and ranking logic."""

from __future__ import annotations

import math

import pytest
import torch

from emo_bench.contenders import Contender, quality_contenders
from emo_bench.quality import mark_roles, run_one, run_quality
from emo_bench.workloads import WORKLOADS, get_workloads

CPU = torch.device("cpu")
CONTENDERS = quality_contenders()


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_each_workload_runs_5_steps_with_every_optimizer(workload: str) -> None:
    w = WORKLOADS[workload]
    for contender in CONTENDERS:
        result = run_one(w, contender, seed=0, steps=5, device=CPU, lr_every=2)
        assert len(result.losses) == 5, contender.name
        assert all(math.isfinite(v) for v in result.losses), contender.name
        assert math.isfinite(result.metric), contender.name
        assert [s for s, _ in result.lr_trace] == [1, 3, 5]
        lrs = [lr for _, lr in result.lr_trace]
        if contender.family == "emo":  # emoPulse stays inside [min_lr, max_lr]
            assert all(1e-6 * 0.999 <= lr <= 1e-3 * 1.001 for lr in lrs), (contender.name, lrs)
        elif contender.family in ("adamw", "lion"):
            assert lrs == [contender.lr] * 3


def test_runs_are_reproducible_per_seed_and_differ_across_seeds() -> None:
    emosens = CONTENDERS[0]
    a = run_one(WORKLOADS["digits"], emosens, seed=3, steps=5, device=CPU)
    b = run_one(WORKLOADS["digits"], emosens, seed=3, steps=5, device=CPU)
    c = run_one(WORKLOADS["digits"], emosens, seed=4, steps=5, device=CPU)
    assert a.losses == b.losses and a.metric == b.metric
    assert a.losses != c.losses


def test_emosens_learns_digits() -> None:
    """Loss goes down and accuracy is far above chance after 150 steps at lr=1.0."""
    result = run_one(WORKLOADS["digits"], CONTENDERS[0], seed=0, steps=150, device=CPU)
    assert sum(result.losses[-10:]) / 10 < 0.5 * result.losses[0]
    assert result.metric > 70.0
    assert not result.diverged


def test_a_blowing_up_optimizer_is_counted_as_diverged() -> None:
    sgd = Contender("SGD lr=50", "sgd", lambda ps: torch.optim.SGD(ps, lr=50.0), 50.0)
    result = run_one(WORKLOADS["quadratic"], sgd, seed=0, steps=60, device=CPU, lr_every=10)
    assert result.diverged
    assert len(result.losses) < 60  # stopped early at the first non-finite check


def test_schedulefree_is_switched_between_train_and_eval() -> None:
    sf = next(c for c in CONTENDERS if c.family == "schedulefree")
    opt = sf.build([torch.nn.Parameter(torch.zeros(3))])
    sf.train_mode(opt)
    assert opt.param_groups[0]["train_mode"] is True
    sf.eval_mode(opt)
    assert opt.param_groups[0]["train_mode"] is False


def test_tuned_adamw_is_best_of_sweep_and_gaps_have_the_right_sign() -> None:
    rows = run_quality(
        get_workloads(["quadratic"]),
        [c for c in CONTENDERS if c.family in ("adamw", "emo")][:5],
        seeds=[0, 1],
        steps=40,
        progress=False,
    )["quadratic"]
    adamw = [r for r in rows if r.family == "adamw"]
    tuned = [r for r in adamw if "tuned" in r.role]
    assert len(tuned) == 1
    assert tuned[0].mean == min(r.mean for r in adamw if not r.diverged)  # lower is better
    assert tuned[0].gap_to_tuned_adamw_pct == 0.0
    for r in rows:
        assert (r.gap_to_tuned_adamw_pct >= 0) == (r.mean >= tuned[0].mean)
        assert r.seeds == 2 and len(r.values) == 2
        assert r.std == pytest.approx(abs(r.values[0] - r.values[1]) / math.sqrt(2))
    assert [r.role for r in adamw if r.lr == 1e-3][0].endswith("default")


def test_mark_roles_prefers_higher_metric_when_higher_is_better() -> None:
    from emo_bench.quality import QualityRow

    def row(lr: float, mean: float, diverged: int = 0) -> QualityRow:
        return QualityRow(
            "w",
            f"AdamW {lr}",
            "adamw",
            lr,
            "acc",
            True,
            mean,
            0.0,
            [mean],
            diverged,
            1,
            0.0,
            lr,
            lr,
        )

    rows = mark_roles([row(1e-3, 90.0), row(3e-3, 99.0, diverged=1), row(1e-2, 95.0)])
    assert [r.role for r in rows] == ["default", "", "tuned"]  # diverged config ranks last
    assert rows[0].gap_to_tuned_adamw_pct == pytest.approx(100 * 5 / 95)


def test_unknown_workload_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Invalid --workloads: nope .*digits"):
        get_workloads(["nope"])
