"""Run a third-party training script unmodified, offline, against a tiny local model.

kohya sd-scripts and the diffusers example scripts are written for a GPU box with a hub
connection and SD1.x-sized weights. This launcher prepares the *process* (never the
script) and then runs the script with ``runpy`` as ``__main__``:

- hub access off (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_DATASETS_OFFLINE``);
- ``--path DIR`` entries go first on ``sys.path`` (extra packages installed with
  ``pip install --target``, kept out of the main environment);
- a torchvision whose compiled part cannot load next to this torch (the registry's
  Linux wheel is a CUDA build) gets the two operator schemas its import registers fake
  kernels for, so ``torchvision.transforms`` imports;
- for sd-scripts only (a ``library/`` package beside the script):
  ``transformers.CLIPFeatureExtractor`` (removed in transformers 5, imported by
  sd-scripts) is aliased to ``CLIPImageProcessor`` when missing, and sd-scripts' own SD1.x
  U-Net's size constants are set from the model's ``unet/config.json`` (they equal the
  defaults for a real SD1.x model);
- ``--trace FILE`` appends one JSON line per optimizer step with each group's ``lr``
  and, for Emo optimizers, the applied ``emo_lr`` and how many losses the optimizer has
  sensed: observation only, through ``torch.optim``'s global step hook.

Usage (one process, CPU, no accelerate config needed)::

    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no integrations/recipes/run_offline.py \\
        --path /scratch/pydeps --path /scratch/tvdeps --trace trace.jsonl \\
        /scratch/sd-scripts/train_network.py --pretrained_model_name_or_path ... [script args]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import runpy
import sys
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_KEEP_ALIVE: list[object] = []


def go_offline() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def prepare_torchvision() -> str:
    """Declare torchvision's operator schemas when its compiled extension cannot load."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "absent"
    extensions = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(
        Path(spec.origin).parent.glob("_C*.pyd")
    )
    try:
        if not extensions:
            raise OSError("no compiled extension")
        torch.ops.load_library(str(extensions[0]))
        return "native"
    except OSError:
        library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _TORCHVISION_SCHEMAS.values():
            library.define(schema)
        _KEEP_ALIVE.append(library)
        return "schemas declared"


def alias_clip_feature_extractor() -> bool:
    """Give transformers 5 back the old name sd-scripts imports; True if aliased."""
    import transformers

    processor = transformers.CLIPImageProcessor  # touching it swaps in the real module
    module = sys.modules["transformers"]
    if hasattr(module, "CLIPFeatureExtractor"):
        return False
    module.CLIPFeatureExtractor = processor
    return True


def _option(argv: list[str], name: str) -> str | None:
    for index, token in enumerate(argv):
        if token == name and index + 1 < len(argv):
            return argv[index + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def is_sd_scripts(script: Path) -> bool:
    """A script of kohya sd-scripts: its ``library`` package sits beside it."""
    return (script.parent / "library" / "train_util.py").is_file()


def size_kohya_unet(script_dir: Path, script_argv: list[str]) -> dict[str, object]:
    """Set sd-scripts' U-Net module constants from ``<model>/unet/config.json``."""
    model = _option(script_argv, "--pretrained_model_name_or_path")
    if not (script_dir / "library" / "original_unet.py").is_file() or model is None:
        return {}
    config_path = Path(model) / "unet" / "config.json"
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text())
    from library import original_unet  # sd-scripts' module, found via the script's folder

    channels = tuple(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    values: dict[str, object] = {
        "BLOCK_OUT_CHANNELS": channels,
        "TIMESTEP_INPUT_DIM": channels[0],
        "TIME_EMBED_DIM": channels[0] * 4,
        "IN_CHANNELS": int(config["in_channels"]),
        "OUT_CHANNELS": int(config["out_channels"]),
        "LAYERS_PER_BLOCK": layers,
        "LAYERS_PER_BLOCK_UP": layers + 1,
        "NORM_GROUPS": int(config["norm_num_groups"]),
        "NORM_EPS": float(config["norm_eps"]),
        "TRANSFORMER_NORM_NUM_GROUPS": int(config["norm_num_groups"]),
        "DOWN_BLOCK_TYPES": list(config["down_block_types"]),
        "UP_BLOCK_TYPES": list(config["up_block_types"]),
    }
    changed = {k: v for k, v in values.items() if getattr(original_unet, k, None) != v}
    for key, value in changed.items():
        setattr(original_unet, key, value)
    return changed


def install_step_trace(path: Path) -> None:
    """Append ``{"step", "lr", "emo_lr", "sensed_steps"}`` per optimizer step (JSON lines)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    counts: dict[int, int] = {}
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(optimizer, args, kwargs) -> None:
        key = id(optimizer)
        counts[key] = counts.get(key, 0) + 1
        groups = optimizer.param_groups
        line = {
            "optimizer": type(optimizer).__name__,
            "step": counts[key],
            "lr": [float(group["lr"]) for group in groups],
        }
        if all("emo_lr" in group for group in groups):
            line["emo_lr"] = [float(group["emo_lr"]) for group in groups]
        telemetry = getattr(optimizer, "telemetry", None)
        if callable(telemetry):  # Emo: how many losses reached the sensor, and their EMA
            sensor = telemetry()
            line["sensed_steps"] = int(sensor["sensed_steps"])
            line["loss_ema_short"] = sensor["ema_short"]
        with path.open("a") as stream:
            stream.write(json.dumps(line) + "\n")

    register_optimizer_step_post_hook(record)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a training script unmodified, offline, on a tiny local model.",
        usage="%(prog)s [--path DIR]... [--trace FILE] SCRIPT [SCRIPT ARGS...]",
    )
    parser.add_argument("--path", action="append", default=[], help="prepend DIR to sys.path")
    parser.add_argument("--trace", type=Path, help="JSON-lines file for per-step LRs")
    parser.add_argument("script", type=Path, help="the training script to run")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    if not args.script.is_file():
        parser.error(f"script not found: {args.script} (fetch the project that ships it first)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    go_offline()
    script = args.script.resolve()
    # What `python script.py` would do: the script's folder first on the path.
    sys.path[:0] = [str(script.parent), *(str(Path(p).resolve()) for p in args.path)]
    report: dict[str, object] = {"torchvision": prepare_torchvision()}
    if is_sd_scripts(script):
        report["CLIPFeatureExtractor aliased"] = alias_clip_feature_extractor()
        report["sd-scripts U-Net constants set"] = sorted(
            size_kohya_unet(script.parent, args.script_args)
        )
    print(f"[run_offline] {json.dumps(report)}", file=sys.stderr)
    if args.trace is not None:
        install_step_trace(args.trace)
    sys.argv = [str(script), *args.script_args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
