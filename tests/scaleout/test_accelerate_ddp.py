"""DDP through accelerate on 2 CPU processes (gloo): replicas identical, Emo API reachable.

``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.x (its
multi-CPU path goes through mpirun/oneCCL), so the test launches with ``--multi_gpu`` (the
torchrun launcher) and the script asks for ``Accelerator(cpu=True)``: 2 gloo CPU ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_accelerate_worker.py")
NAMES = ("emosens", "emoairy", "emocats")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("accelerate")
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(_free_port())),
        *(str(WORKER), str(out / "report.json")),
    ]
    env = {**os.environ, "HF_HOME": str(out / "hf"), "OMP_NUM_THREADS": "1"}  # no user config
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_replicas_identical_under_accelerate_ddp(report: dict, name: str) -> None:
    result = report[name]
    assert result["world"] == 2
    assert result["replicas_identical"], f"replicas differ by {result['replica_max_diff']}"
    assert result["steps"] == result["micro_batches"] / 2  # accumulation: 2 micro-batches/step
    assert result["skipped"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_emo_api_reachable_through_accelerated_optimizer(report: dict, name: str) -> None:
    result = report[name]
    assert result["wrapped"], "accelerator.prepare should wrap the optimizer"
    assert result["unwrap_is_inner"], "emo_core.unwrap(opt) should be opt.optimizer"


@pytest.mark.parametrize("name", NAMES)
def test_sensed_loss_is_the_mean_over_ranks_and_micro_batches(report: dict, name: str) -> None:
    """add_loss per micro-batch + the in-step all-reduce: every rank senses the global mean."""
    result = report[name]
    assert result["first_sensed_loss"] == pytest.approx(result["first_step_global_mean"], rel=1e-6)


def test_bf16_replicas_identical_with_a_shared_rounding_seed(report: dict) -> None:
    assert report["emosens-bf16-same-seed"]["replicas_identical"]


def test_bf16_replicas_identical_with_default_seed(report: dict) -> None:
    result = report["emosens-bf16"]
    assert result["replicas_identical"], f"replicas differ by {result['replica_max_diff']}"
