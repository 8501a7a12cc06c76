"""FSDP2 checkpoints through torch.distributed.checkpoint.state_dict (issue 13, item 10).

Two gloo ranks train, save with ``get_state_dict`` + ``dcp.save`` and are SIGKILLed; two new
processes load with ``set_state_dict`` and continue: bitwise what an uninterrupted run gives
(the loss sensor and step counter travel in ``param_groups[0]["emo_state"]``, which these
helpers keep; before, ``get_optimizer_state_dict`` raised KeyError: 'emo_pulse').
"""

from __future__ import annotations

import signal

import pytest
import torch
import torch.multiprocessing as mp

from tests.scaleout import _dcp_worker

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dcp")
    context = mp.start_processes(
        _dcp_worker.save_then_die,
        args=(2, str(out / "rendezvous-1"), str(out)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    for process in context.processes:
        process.join(timeout=300)
    assert [p.exitcode for p in context.processes] == [-signal.SIGKILL] * 2
    mp.spawn(
        _dcp_worker.resume_and_reference,
        args=(2, str(out / "rendezvous-2"), str(out)),
        nprocs=2,
        join=True,
    )
    return {
        name: torch.load(out / f"{name}.pt", weights_only=True) for name in _dcp_worker.OPTIMIZERS
    }


@pytest.mark.parametrize("name", tuple(_dcp_worker.OPTIMIZERS))
def test_killed_fsdp2_run_resumes_bitwise_through_dcp_state_dict_helpers(
    results: dict, name: str
) -> None:
    result = results[name]
    for resumed, reference in zip(result["resumed"], result["reference"]):
        assert torch.equal(resumed, reference)
    resumed_telemetry, reference_telemetry = result["telemetry"]
    assert resumed_telemetry == reference_telemetry
    assert resumed_telemetry["step"] == _dcp_worker.STEPS
