"""Quality harness: every workload trains with every optimizer; divergence and ranking logic."""

from __future__ import annotations

import math

import pytest
import torch

from emo_bench.contenders import Contender, adamw, emo_contenders, quality_contenders
from emo_bench.quality import run_one, run_quality
from emo_bench.workloads import WORKLOADS, finetune, get_workloads, lora
from emo_core import EmoSens, EmoSensScheduleFree

CPU = torch.device("cpu")
CONTENDERS = quality_contenders()


@pytest.fixture(autouse=True)
def short_lora_pretraining(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LoRA base pretrains for 400 steps in a real run; 20 are enough to test plumbing."""
    monkeypatch.setattr(lora, "PRETRAIN_STEPS", 20)


def test_there_are_ten_workloads_including_the_pretrained_ones() -> None:
    assert set(WORKLOADS) == {
        "digits", "charlm", "flow", "quadratic", "finetune", "lora", "conv", "autoencoder",
        "regression", "rnn",
    }  # fmt: skip


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
        assert all(math.isfinite(lr) and lr > 0 for lr in lrs), (contender.name, lrs)
        v37 = contender.options.get("pulse") == "v37"
        if contender.family == "emo" and v37:  # the v3.7 pulse stays inside [min_lr, max_lr]
            assert all(1e-6 * 0.999 <= lr <= 1e-3 * 1.001 for lr in lrs), (contender.name, lrs)
        elif contender.family == "adamw":
            assert lrs == [contender.lr] * 3


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_every_workload_is_deterministic_per_seed_and_differs_across_seeds(workload: str) -> None:
    w, opt = WORKLOADS[workload], adamw(3e-3)
    a = run_one(w, opt, seed=3, steps=4, device=CPU)
    b = run_one(w, opt, seed=3, steps=4, device=CPU)
    c = run_one(w, opt, seed=4, steps=4, device=CPU)
    assert a.losses == b.losses and a.metric == b.metric
    assert a.losses != c.losses


def test_a_bare_factory_runs_and_reports_its_effective_lr() -> None:
    result = run_one(WORKLOADS["quadratic"], lambda ps: torch.optim.SGD(ps, lr=0.05), seed=0)
    assert result.steps == WORKLOADS["quadratic"].steps and not result.diverged
    assert {lr for _, lr in result.lr_trace} == {0.05}
    emo = run_one(WORKLOADS["digits"], lambda ps: EmoSens(ps, lr=1.0), seed=0, steps=20)
    assert emo.losses[-1] < emo.losses[0]  # Emo optimizers get step(loss=...) here too


def test_emosens_learns_digits() -> None:
    """Loss goes down and accuracy is far above chance after 150 steps at lr=1.0."""
    result = run_one(WORKLOADS["digits"], CONTENDERS[0], seed=0, steps=150, device=CPU)
    assert sum(result.losses[-10:]) / 10 < 0.5 * result.losses[0]
    assert result.metric > 70.0
    assert not result.diverged


def test_finetune_overshoot_destroys_what_pretraining_learned() -> None:
    """Real pretraining (600 steps): the base is good on clean digits, at chance on shifted
    ones; fine-tuning at 3e-3 beats both a too-small (1e-4) and a too-large (3e-2) step."""
    task = finetune.FinetuneTask(0, CPU)
    with torch.no_grad():
        clean = (task.model(task.x_val_old).argmax(1) == task.y_val).float().mean()
        shifted = (task.model(task.x_val_new).argmax(1) == task.y_val).float().mean()
    assert clean > 0.9 and shifted < 0.3
    w = WORKLOADS["finetune"]
    small, good, large = (run_one(w, adamw(lr), 0, 120).metric for lr in (1e-4, 3e-3, 3e-2))
    assert good > small + 5 and good > large + 5, (small, good, large)


def test_lora_trains_only_the_adapters_and_starts_at_the_pretrained_model() -> None:
    task = lora.LoRATask(0, CPU)
    trainable = task.parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    frozen = [p for p in task.model.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in trainable) < 0.2 * sum(p.numel() for p in frozen)
    base = lora.CharTransformer(lora.load_corpora()[3])
    base.load_state_dict(lora.pretrained_char_lm(lora.PRETRAIN_STEPS))
    ids = task.val_windows[:2, :-1]
    with torch.no_grad():
        torch.testing.assert_close(task.model(ids), base(ids))  # B = 0: no change at step 0
    before = [p.detach().clone() for p in frozen]
    run = run_one(WORKLOADS["lora"], adamw(1e-2), 0, 3)
    assert run.losses[0] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))


def test_a_blowing_up_optimizer_is_counted_as_diverged() -> None:
    sgd = Contender("SGD lr=50", "sgd", lambda ps: torch.optim.SGD(ps, lr=50.0), 50.0)
    result = run_one(WORKLOADS["quadratic"], sgd, seed=0, steps=60, device=CPU, lr_every=10)
    assert result.diverged
    assert len(result.losses) < 60  # stopped early at the first non-finite check


@pytest.mark.parametrize("family", ["schedulefree", "prodigy-sf"])
def test_schedule_free_optimizers_are_switched_between_train_and_eval(family: str) -> None:
    sf = next(c for c in CONTENDERS if c.family == family)
    p = torch.nn.Parameter(torch.ones(3))
    opt = sf.build([p])
    sf.train_mode(opt)
    assert opt.param_groups[0]["train_mode"] is True
    p.grad = torch.ones(3)
    opt.step()
    sf.eval_mode(opt)
    assert opt.param_groups[0]["train_mode"] is False


def test_prodigy_plus_schedule_free_reports_d_times_lr() -> None:
    ppsf = next(c for c in CONTENDERS if c.family == "prodigy-sf")
    result = run_one(WORKLOADS["quadratic"], ppsf, seed=0, steps=30, lr_every=1)
    lrs = [lr for _, lr in result.lr_trace]
    assert lrs[0] == pytest.approx(1e-6)  # d0
    assert lrs[-1] > 10 * lrs[0]  # d grows


def test_sweep_covers_1e4_to_3e2_and_every_family_is_present() -> None:
    lrs = sorted(c.lr for c in CONTENDERS if c.family == "adamw")
    assert lrs == pytest.approx([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    families = {c.family for c in CONTENDERS}
    assert {"emo", "adamw", "prodigy", "prodigy-sf", "schedulefree"} <= families
    names = [c.name for c in CONTENDERS if c.family == "emo"]
    assert names == [
        "EmoSens",
        "EmoAiry",
        "EmoCats",
        "EmoSens pulse=v37",
        "EmoAiry pulse=v37",
        "EmoCats pulse=v37",
        "EmoSens pulse=distance average=False",
        "EmoCats pulse=distance average=False",
        "EmoSens weight_decay=0.01",
    ]


def test_emo_rows_switch_train_and_eval_so_averaging_evaluates_the_average() -> None:
    averaged = next(c for c in CONTENDERS if c.name == "EmoSens")  # averaged by default
    p = torch.nn.Parameter(torch.zeros(3))
    opt = averaged.build([p])
    averaged.train_mode(opt)
    p.grad = torch.ones(3)
    averaged.step(opt, torch.tensor(1.0))
    averaged.eval_mode(opt)
    assert not opt.training
    averaged.train_mode(opt)
    assert opt.training


def test_pulse_rows_exist_only_when_the_constructor_accepts_pulse() -> None:
    class WithPulse(EmoSens):
        def __init__(self, params, lr: float = 1.0, *, pulse: str = "new", **kw) -> None:
            super().__init__(params, lr, pulse=pulse, **kw)

    class Without(EmoSens):
        def __init__(self, params, lr: float = 1.0) -> None:
            super().__init__(params, lr)

    variants = [(WithPulse, {}), (WithPulse, {"pulse": "v37"}), (Without, {"pulse": "v37"})]
    rows = emo_contenders(variants)
    assert [c.name for c in rows] == ["WithPulse", "WithPulse pulse=v37"]
    opt = rows[1].build([torch.nn.Parameter(torch.zeros(2))])
    assert opt.pulse == "v37" and rows[1].options == {"lr": 1.0, "pulse": "v37"}


def test_tuned_adamw_is_best_of_sweep_and_gaps_have_the_right_sign() -> None:
    rows = run_quality(
        get_workloads(["quadratic"]),
        [c for c in CONTENDERS if c.family == "emo"][:1]
        + [c for c in CONTENDERS if c.family == "adamw"],
        seeds=[0, 1],
        steps=40,
        progress=False,
    )["quadratic"]
    adamw_rows = [r for r in rows if r.family == "adamw"]
    tuned = [r for r in adamw_rows if "tuned" in r.role]
    assert len(tuned) == 1
    assert tuned[0].mean == min(r.mean for r in adamw_rows if not r.diverged)  # lower is better
    assert tuned[0].gap_to_tuned_adamw_pct == 0.0
    for r in rows:
        assert (r.gap_to_tuned_adamw_pct >= 0) == (r.mean >= tuned[0].mean)
        assert r.seeds == 2 and len(r.values) == 2
        assert r.std == pytest.approx(abs(r.values[0] - r.values[1]) / math.sqrt(2))
        assert r.lr_min <= r.lr_median <= r.lr_max
    assert [r.role for r in adamw_rows if r.lr == 1e-3][0].endswith("default")


@pytest.mark.slow
def test_jobs_2_gives_the_same_results_as_jobs_1() -> None:
    chosen = [c for c in CONTENDERS if c.name in ("EmoSens", "AdamW lr=0.003", "Prodigy")]
    assert len(chosen) == 3
    kwargs = dict(seeds=[0, 1], steps=6, progress=False)
    one = run_quality(get_workloads(["quadratic"]), chosen, jobs=1, **kwargs)
    two = run_quality(get_workloads(["quadratic"]), chosen, jobs=2, **kwargs)
    for name in one:
        assert [r.values for r in one[name]] == [r.values for r in two[name]]
        assert [r.lr_curve for r in one[name]] == [r.lr_curve for r in two[name]]


def test_jobs_refuses_a_factory_it_cannot_send_to_workers() -> None:
    custom = Contender("mine", "custom", lambda ps: torch.optim.SGD(ps, lr=0.1), 0.1)
    with pytest.raises(ValueError, match="Invalid jobs: 2 .*mine.*jobs=1"):
        run_quality(get_workloads(["quadratic"]), [custom], [0], steps=2, progress=False, jobs=2)


def test_unknown_workload_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Invalid --workloads: nope .*digits"):
        get_workloads(["nope"])


def test_a_bare_factory_of_an_averaged_optimizer_is_evaluated_at_the_average() -> None:
    """``run_one``/``compare`` with ``lambda ps: EmoSensScheduleFree(ps)`` measures the
    average ``x``, as the bench's own row does (a bare factory was evaluated at the training
    point ``y``: on the quadratic 0.033 instead of 0.003)."""
    quadratic = WORKLOADS["quadratic"]
    row = next(c for c in CONTENDERS if c.name == "EmoSens")  # the same configuration
    bare = run_one(quadratic, lambda ps: EmoSensScheduleFree(ps, lr=1.0), seed=0, steps=300)
    registered = run_one(quadratic, row, seed=0, steps=300)
    assert bare.metric == registered.metric
