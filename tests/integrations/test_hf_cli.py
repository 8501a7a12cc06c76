"""``python -m emo_hf.train``: each optimizer end to end, JSON configs, LoRA, 2-process DDP."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from emo_core import unwrap  # noqa: E402
from emo_hf.train import main, parse_args  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "hf").glob("*.json"))
TINY = [
    "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
    "--intermediate_size", "64", "--block_size", "32", "--max_chars", "20000",
    "--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true",
    "--save_strategy", "no", "--dataloader_pin_memory", "false", "--lr_scheduler_type", "constant",
]  # fmt: skip


@pytest.mark.parametrize(
    ("optim", "optim_args"),
    [("emosens", None), ("emoairy", "clip_threshold=2.0"), ("emocats", "use_shadow=True")],
)
def test_cli_trains_each_optimizer_end_to_end(tmp_path, capsys, optim, optim_args):
    out = tmp_path / optim
    argv = [*TINY, "--optim", optim, "--output_dir", str(out), "--max_steps", "12",
            "--logging_steps", "3"]  # fmt: skip
    if optim_args:
        argv += ["--optim_args", optim_args]
    trainer = main(argv)

    optimizer = unwrap(trainer.optimizer)
    assert type(optimizer).__name__.lower() == optim
    if optim == "emocats":
        assert all(group["use_shadow"] for group in optimizer.param_groups)
    if optim == "emoairy":
        assert all(group["clip_threshold"] == 2.0 for group in optimizer.param_groups)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4
    assert losses[-1] < losses[0]  # it learns: byte statistics come fast
    printed = capsys.readouterr().out
    assert f"({optim})" in printed and f"{losses[-1]:.4f}" in printed
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The saved model and tokenizer load back through the ordinary path.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(out).decode([75, 108]) == "Hi"  # bytes + 3


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_parse(config):
    model_args, data_args, training_args = parse_args([str(config)])
    settings = json.loads(config.read_text())
    optim = getattr(training_args.optim, "value", training_args.optim)  # enum for native names
    assert optim == settings["optim"]
    assert training_args.max_steps == settings["max_steps"]
    assert model_args.lora == settings.get("lora", False)
    assert data_args.block_size == settings["block_size"]


def test_json_config_with_overrides_and_lora(tmp_path):
    pytest.importorskip("peft")
    config = REPO / "configs" / "hf" / "emosens_lora.json"
    trainer = main(
        [str(config), *TINY, "--output_dir", str(tmp_path), "--max_steps", "4",
         "--logging_steps", "2", "--eval_strategy", "no", "--plot", "false"]
    )  # fmt: skip
    assert trainer.args.gradient_accumulation_steps == 2  # from the JSON
    assert trainer.state.global_step == 4  # from the command line
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert not (tmp_path / "loss_curve.png").exists()


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--validation_fraction", "0"], r"--validation_fraction: .*eval_strategy='steps'"),
        (["--validation_fraction", "1.5"], r"--validation_fraction: Invalid validation_fraction"),
        (["--block_size", "1"], r"--block_size: Invalid block_size: 1"),
        (["--max_chars", "0"], r"--max_chars: Invalid max_chars: 0"),
        (["--validation_fraction", "0.9999"], r"--block_size: .*exceeds the \d+ tokens"),
    ],
)
def test_bad_data_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, match):
    # The shipped config evaluates every 100 steps: --validation_fraction 0 left no eval set,
    # and transformers' ValueError came as a traceback once the model was built.
    with pytest.raises(SystemExit) as exit_info:
        main(["emosens", *TINY, "--output_dir", str(tmp_path), "--max_steps", "1", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"error: argument " + match, err), err
    assert "Traceback" not in err


def test_json_config_rejects_unknown_keys(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"optim": "emosens", "learning_rat": 1.0}))
    with pytest.raises(SystemExit) as exit_info:
        parse_args([str(config)])
    assert exit_info.value.code == 2
    assert "invalid keys learning_rat" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["emosens", "hf/emosens.json", "configs/hf/emosens.json"])
def test_shipped_config_by_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the name resolves to the shipped file
    _, _, training_args = parse_args([name, "--output_dir", str(tmp_path)])
    assert training_args.optim == "emosens" and training_args.max_steps == 300


def test_unknown_config_name_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["emosense"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'emosense' is neither a file nor a shipped hf config" in err
    assert "emosens, emosens_lora" in err


def test_multi_process_launch_that_would_not_be_distributed_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; without --use_cpu on a CPU box
    with pytest.raises(ValueError, match="--use_cpu true"):
        main([*TINY, "--optim", "emosens", "--output_dir", str(tmp_path), "--max_steps", "1"])


WORKER = """
import os, sys, torch
from transformers import TrainerCallback
from emo_hf.train import main

torch.set_num_threads(1)


class LocalLosses(TrainerCallback):
    \"\"\"This rank's own micro-batch losses, read off the model's outputs.\"\"\"

    def __init__(self):
        self.losses = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_hook(lambda m, i, out: self.losses.append(float(out.loss.detach())))


local = LocalLosses()
trainer = main(sys.argv[1:], callbacks=[local])
params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
lrs = [e["learning_rate"] for e in trainer.state.log_history if "loss" in e]
record = {
    "params": params,
    "losses": torch.tensor(local.losses),
    "lrs": torch.tensor(lrs),
    "world": trainer.args.world_size,
}
torch.save(record, os.path.join(trainer.args.output_dir, f"rank{trainer.args.process_index}.pt"))
# Leave without interpreter teardown: gloo's threads occasionally abort there (SIGABRT,
# "terminate called without an active exception") after all the work is done.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_torchrun_two_processes_end_with_identical_replicas(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(worker),
        *TINY, "--optim", "emosens", "--output_dir", str(out), "--max_steps", "6",
        "--logging_steps", "2", "--use_cpu", "true", "--ddp_backend", "gloo",
        "--ddp_find_unused_parameters", "false", "--plot", "false",
        # a max_lr the pulse stays under, so the LR really follows the (averaged) loss
        "--optim_args", "max_lr=1e-2",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert rank0["world"] == rank1["world"] == 2
    # Each rank saw its own shard of the data, so its local losses differ, and the LR
    # moved with the loss (unclamped): rank-local losses would have given rank-local LRs ...
    assert not torch.equal(rank0["losses"], rank1["losses"])
    assert len(set(rank0["lrs"].tolist())) > 1
    # ... yet the loss is averaged inside step(), every rank uses the same LR, and the
    # replicas stay bitwise identical.
    assert rank0["params"].keys() == rank1["params"].keys()
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
