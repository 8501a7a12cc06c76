"""``emo-bench``: should you use an Emo optimizer with ``lr=1.0`` instead of what you use now?

Subcommands::

    emo-bench quality [--quick] [--jobs 2]  # 10 offline workloads x 18 optimizer configs
                                            # (9 Emo rows, 6 AdamW LRs, 3 lr-free) x seeds
    emo-bench speed   [--quick]   # step time vs torch AdamW, state bytes, host syncs
    emo-bench demo                # quality --quick, then speed --quick (what `make demo` runs)

Each writes ``<out>/quality.md`` + ``quality.png`` (loss curves) + ``quality_lr.png``
(effective LR per workload) + ``quality.json`` (or ``speed.md/png/json``) and
prints the markdown table; with ``--json`` it prints the JSON document instead. Full runs go
to ``emo_bench/results/``, ``--quick`` runs to ``emo_bench/results/quick/`` when run from a
clone; an installed (non-editable) package writes to ``./emo-bench-results/`` (``/quick``)
in the working directory instead of site-packages. ``--out`` changes both.

JSON fields (non-finite numbers are ``null``):

- quality: ``command`` ("quality"), ``settings`` (``command``, ``quick``, ``seeds``,
  ``steps`` per workload, ``adamw_sweep``, ``device``, ``jobs``, ``wall_s``), ``machine`` (``cpu``,
  ``cores``, ``torch_threads``, ``torch``, ``python``, ``os``, ``device``, ``emo`` (version
  and git commit), ``load_avg``[, ``gpu``]),
  ``results``: one object per (workload, optimizer) with ``workload``, ``optimizer``,
  ``family``, ``lr``, ``metric``, ``higher_is_better``, ``mean``, ``std``, ``values`` (per
  seed), ``diverged`` (count), ``seeds``, ``wall_s`` (per run), ``lr_min``, ``lr_max``,
  ``lr_median`` (effective LR over the traces of all seeds), ``gap_to_tuned_adamw_pct``
  (+ = worse), ``role`` ("tuned", "default", "tuned,default" or "");
  ``summary``: one object per optimizer (every non-AdamW row, then "AdamW tuned per
  workload", then the best single AdamW LR) with ``optimizer``, ``family``, ``role``,
  ``within_2pct`` (workloads with gap <= 2% and no divergence), ``workloads``,
  ``geomean_ratio`` (geometric mean over workloads of ``1 + gap/100``, clipped to [0.1, 10];
  lower is better, tuned AdamW = 1), ``divergences``, ``gaps`` ({workload: pct}), ``lr``;
  ``best_single_adamw_lr``; ``tuned_adamw_lr`` ({workload: lr}); ``lr_traces``
  ({workload: {optimizer: [[step, lr], ...]}}, seed 0, non-AdamW rows); ``spike`` (per Emo
  optimizer: ``optimizer``, ``lr_before``, ``lr_after``, ``lr_recovered`` around a one-step
  10x loss on digits, see ``emo_bench.spike``); and ``files``
  (``markdown``, ``plot``, ``lr_plot``, ``json``).
- speed: ``command`` ("speed"), ``settings`` (``command``, ``quick``, ``device``,
  ``warmup``, ``repeats``, ``steps``, ``wall_s``), ``machine``, ``layouts`` (``name``,
  ``title``, ``params``, ``tensors``), ``results``: one object per (layout, optimizer) with
  ``layout``, ``optimizer``, ``step_ms`` (median), ``step_ms_min``, ``ratio_fused``,
  ``ratio_foreach``, ``ratio_forloop`` (vs torch AdamW), ``state_bytes_per_param``,
  ``syncs_per_step``, ``reads_per_step``, ``first_step_s`` (the untimed first call:
  allocation, and compiling for ``compile_update`` rows); ``targets`` (``target``, ``measured``, ``met``),
  ``roofline`` (CUDA with ``--roofline``, else null), ``files``.
- demo: ``{"command": "demo", "quality": <quality>, "speed": <speed>}``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import report
from .contenders import ADAMW_SWEEP, quality_contenders
from .machine import RESULTS_DIR, RUNNING_FROM_CLONE, describe_machine, set_threads
from .workloads import WORKLOADS, get_workloads

__all__ = ["RESULTS_DIR", "RUNNING_FROM_CLONE", "main", "run_quality_command", "run_speed_command"]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _usage_error(message: str) -> SystemExit:
    """A bad flag value found after parsing: said like argparse's own errors (exit 2)."""
    print(f"emo-bench: error: {message}", file=sys.stderr)
    return SystemExit(2)


def _names(value: str) -> list[str]:
    """A filter of names: an empty one (an unset shell variable) is refused, not "all"."""
    names = _csv(value)
    if not names:
        raise argparse.ArgumentTypeError(f"empty ({value!r}); leave the flag out for all")
    return names


def _out_folder(value: str) -> Path:
    """``--out``: checked before any run (a file in its place failed after the whole run)."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a file, expected a folder")
    # the folder is made after the run: its nearest existing parent must take it
    parent = next(p for p in path.absolute().parents if p.exists())
    if not path.exists() and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is inside {str(parent)!r}, a file")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{value!r} is not writable")
    return path


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"Invalid --seeds: {value!r} (expected comma-separated integers, e.g. 0,1,2)"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("Invalid --seeds: empty (e.g. --seeds 0,1,2)")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:  # (the same run twice: its std 0 said nothing about seeds)
        raise argparse.ArgumentTypeError(
            f"Invalid --seeds: {value!r} ({', '.join(map(str, twice))} given twice)"
        )
    return seeds


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _device(value: str) -> torch.device:
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"Invalid --device: {value!r} ({err})") from None
    if device.type not in ("cpu", "cuda"):  # (meta, mps, ...: a bare error in the first run)
        raise argparse.ArgumentTypeError(f"Invalid --device: {value!r} (expected cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            "Invalid --device: cuda, but torch.cuda.is_available() is False on this machine "
            "(use --device cpu)"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"Invalid --device: {value!r}, but this machine has {torch.cuda.device_count()} "
            "CUDA device(s)"
        )
    return device


def _pick(names: list[str] | None, available: list[str], flag: str) -> list[str]:
    """Filter by slug: an exact name picks that entry (``emocats``), otherwise a prefix picks
    all it starts (``adamw``: the whole AdamW sweep; ``emocats-compile``: the compiled one)."""
    if not names:
        return available
    slugs = {_slug(a) for a in available}

    def wanted(slug: str, name: str) -> bool:
        return slug == name if name in slugs else slug.startswith(name)

    chosen = [a for a in available if any(wanted(_slug(a), _slug(n)) for n in names)]
    missing = [n for n in names if not any(_slug(a).startswith(_slug(n)) for a in available)]
    if missing:
        choices = ", ".join(dict.fromkeys(_slug(a) for a in available))
        raise _usage_error(f"Invalid {flag}: {', '.join(missing)} (choose from {choices})")
    return chosen


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="short run (what `make demo` uses)")
    parser.add_argument(
        "--device",
        type=_device,
        default=torch.device("cpu"),
        help="cpu (default) or cuda when a GPU is present",
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="torch intra-op threads (default: 1, so that results are comparable on a busy "
        "or small machine; the quality models are too small to gain from more)",
    )
    parser.add_argument(
        "--out",
        type=_out_folder,
        default=None,
        help="results folder (default: emo_bench/results in a clone, ./emo-bench-results when "
        "installed; --quick adds /quick)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the JSON document instead of the markdown table"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emo-bench",
        description="Measured quality and speed of the Emo optimizers vs AdamW, Prodigy, "
        "Prodigy + Schedule-Free, Schedule-Free AdamW and Lion.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="train the offline workloads with every optimizer")
    _common(q)
    q.add_argument("--seeds", type=_seeds, default=None, help="e.g. 0,1,2 (default: 0,1,2)")
    q.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="steps for every workload (default: per workload)",
    )
    q.add_argument(
        "--workloads",
        type=_names,
        default=None,
        help=f"comma-separated: {', '.join(WORKLOADS)} (default: all)",
    )
    q.add_argument(
        "--optimizers",
        type=_names,
        default=None,
        help="comma-separated prefixes: emosens, emoairy, emocats, adamw, prodigy, "
        "schedule-free, lion (default: all but lion)",
    )
    q.add_argument(
        "--jobs",
        type=_positive,
        default=1,
        help="worker processes for the (workload, optimizer, seed) runs (default: 1; each "
        "worker uses --threads threads; results do not depend on it)",
    )
    s = sub.add_parser("speed", help="step time, state bytes and host syncs per optimizer")
    _common(s)
    s.add_argument("--layouts", type=_names, default=None, help="dense, lora (default: both)")
    s.add_argument(
        "--optimizers",
        type=_names,
        default=None,
        help="comma-separated prefixes, e.g. emosens,adamw (the AdamW references are always kept)",
    )
    s.add_argument("--repeats", type=_positive, default=None, help="timed blocks per optimizer")
    s.add_argument("--steps", type=_positive, default=None, help="steps per timed block")
    s.add_argument("--warmup", type=_positive, default=None, help="untimed steps first")
    s.add_argument(
        "--profile",
        type=_names,
        default=None,
        help="also print a torch.profiler table for these optimizers (e.g. emosens)",
    )
    s.add_argument(
        "--compile",
        action="store_true",
        help="also time the Emo optimizers with torch.compile(opt.step) (slow warm-up)",
    )
    s.add_argument(
        "--roofline",
        action="store_true",
        help="CUDA only: step time vs the HBM bound for a 1B-parameter layout",
    )
    d = sub.add_parser("demo", help="quality --quick then speed --quick (`make demo`)")
    _common(d)
    return parser


def _out_dir(args: argparse.Namespace, quick: bool) -> Path:
    if args.out is not None:
        return args.out
    return RESULTS_DIR / "quick" if quick else RESULTS_DIR


def _say(args: argparse.Namespace, text: str) -> None:
    """Human output: stdout normally, stderr when stdout carries JSON."""
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def run_quality_command(args: argparse.Namespace, quick: bool) -> dict[str, Any]:
    from .plots import plot_lr, plot_quality
    from .quality import run_quality
    from .spike import spike_markdown, spike_rows

    try:
        workloads = get_workloads(getattr(args, "workloads", None))
    except ValueError as err:
        raise _usage_error(str(err)) from None
    wanted = getattr(args, "optimizers", None)
    contenders = quality_contenders(lion=any(_slug(n).startswith("lion") for n in wanted or []))
    names = _pick(wanted, [c.name for c in contenders], "--optimizers")
    contenders = [c for c in contenders if c.name in names]
    seeds = getattr(args, "seeds", None) or [0, 1, 2]
    steps = getattr(args, "steps", None)
    out = _out_dir(args, quick)
    start = time.perf_counter()
    results = run_quality(
        workloads,
        contenders,
        seeds,
        quick=quick,
        steps=steps,
        device=args.device,
        progress=not args.no_progress,
        jobs=getattr(args, "jobs", 1),
    )
    steps_used = {w.name: steps or (w.quick_steps if quick else w.steps) for w in workloads}
    settings = {
        "command": args.command_line,
        "quick": quick,
        "seeds": seeds,
        "steps": steps_used,
        "adamw_sweep": list(ADAMW_SWEEP),
        "device": str(args.device),
        "jobs": getattr(args, "jobs", 1),
        "wall_s": time.perf_counter() - start,
    }
    machine = describe_machine(args.device)
    files = {
        "markdown": str(out / "quality.md"),
        "plot": str(out / "quality.png"),
        "lr_plot": str(out / "quality_lr.png"),
        "json": str(out / "quality.json"),
    }
    plot_quality(
        results,
        {
            w.name: f"{w.name} ({w.metric}: {'higher' if w.higher_is_better else 'lower'} is better)"
            for w in workloads
        },
        {w.name: w.log_scale for w in workloads},
        Path(files["plot"]),
    )
    plot_lr(results, {w.name: f"{w.name}: effective LR" for w in workloads}, Path(files["lr_plot"]))
    titles = {w.name: (w.title, steps_used[w.name], w.batch) for w in workloads}
    spikes = spike_rows(contenders)
    text = report.quality_markdown(
        results, titles, settings, machine, "quality.png", "quality_lr.png"
    )
    text += ("\n" + "\n".join(spike_markdown(spikes))) if spikes else ""
    doc = report.quality_json(results, settings, machine, files)
    doc["spike"] = spikes
    report.write_text(Path(files["markdown"]), text)
    report.write_json(Path(files["json"]), doc)
    if not args.json:
        print(text, flush=True)
    _say(
        args,
        f"quality results: {files['markdown']}, {files['plot']}, {files['lr_plot']}, "
        f"{files['json']}",
    )
    return doc


def _check_speed_optimizers(wanted: list[str], entries: list, quick: bool, device) -> None:
    """A name that only the full run (or ``--compile``) times: say so, not "Invalid"."""
    from .speed import compiled_entries, speed_entries

    def timed(name: str, names: list[str]) -> bool:
        return any(_slug(a).startswith(_slug(name)) for a in names)

    here = [e.name for e in entries]
    full = [e.name for e in speed_entries(False, device)]
    compiled = [e.name for e in compiled_entries()]
    for name in wanted:
        if timed(name, here):
            continue
        if quick and timed(name, full):
            raise _usage_error(
                f"--optimizers: {name} is not timed in quick mode (drop --quick to time it)"
            )
        if timed(name, compiled):
            raise _usage_error(f"--optimizers: {name} is timed only with --compile")


def run_speed_command(args: argparse.Namespace, quick: bool) -> dict[str, Any]:
    from .plots import plot_speed
    from .speed import (
        REFERENCE,
        check_targets,
        compiled_entries,
        layouts,
        profile_steps,
        roofline,
        run_speed,
        speed_entries,
    )

    if getattr(args, "roofline", False) and args.device.type != "cuda":
        raise _usage_error("Invalid --roofline: needs --device cuda (HBM bandwidth bound)")
    entries = speed_entries(quick, args.device)
    if getattr(args, "compile", False):
        entries += compiled_entries()
    wanted = getattr(args, "optimizers", None)
    if wanted:
        _check_speed_optimizers(wanted, entries, quick, args.device)
        names = set(_pick(wanted, [e.name for e in entries], "--optimizers")) | set(REFERENCE)
        entries = [e for e in entries if e.name in names]
    timed = [_slug(e.name) for e in entries]
    unknown = [n for n in getattr(args, "profile", None) or [] if _slug(n) not in timed]
    if unknown:  # (was: the whole run, then nothing printed for them)
        raise _usage_error(
            f"Invalid --profile: {', '.join(unknown)} (an optimizer this run times: "
            f"{', '.join(timed)})"
        )
    chosen = layouts(quick)
    if getattr(args, "layouts", None):
        names = _pick(args.layouts, [lay.name for lay in chosen], "--layouts")
        chosen = [lay for lay in chosen if lay.name in names]
    out = _out_dir(args, quick)
    start = time.perf_counter()
    doc = run_speed(
        quick=quick,
        device=args.device,
        entries=entries,
        chosen_layouts=chosen,
        warmup=getattr(args, "warmup", None),
        repeats=getattr(args, "repeats", None),
        steps=getattr(args, "steps", None),
        progress=not args.no_progress,
    )
    roof = roofline(args.device, entries) if getattr(args, "roofline", False) else None
    files = {
        "markdown": str(out / "speed.md"),
        "plot": str(out / "speed.png"),
        "json": str(out / "speed.json"),
    }
    doc = {
        "command": "speed",
        "settings": {
            "command": args.command_line,
            "quick": quick,
            "device": str(args.device),
            **doc.pop("settings"),
            "wall_s": time.perf_counter() - start,
        },
        "machine": describe_machine(args.device),
        **doc,
        "targets": check_targets(doc["results"]),
        "roofline": roof,
        "files": files,
    }
    plot_speed(doc, Path(files["plot"]))
    text = report.speed_markdown(doc)
    report.write_text(Path(files["markdown"]), text)
    report.write_json(Path(files["json"]), doc)
    if not args.json:
        print(text, flush=True)
    for name in getattr(args, "profile", None) or []:
        for entry in [e for e in entries if _slug(e.name) == _slug(name)]:
            for layout in chosen:
                _say(args, f"\n### profile: {entry.name} on {layout.name}\n")
                _say(args, profile_steps(entry, layout, args.device))
    _say(args, f"speed results: {files['markdown']}, {files['plot']}, {files['json']}")
    return doc


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``emo-bench`` and ``python -m emo_bench``."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["emo-bench", *map(shlex.quote, argv)])
    set_threads(args.threads)
    if args.command == "quality":
        doc = run_quality_command(args, args.quick)
    elif args.command == "speed":
        doc = run_speed_command(args, args.quick)
    else:
        quality = run_quality_command(args, quick=True)
        speed = run_speed_command(args, quick=True)
        doc = {"command": "demo", "quality": quality, "speed": speed}
        _say(
            args,
            "\nemo-bench demo done. Tables and plots: "
            f"{quality['files']['markdown']}, {quality['files']['plot']}, "
            f"{speed['files']['markdown']}, {speed['files']['plot']}",
        )
    if args.json:
        print(report.dumps(doc), flush=True)
    return 0
