"""What a quality workload is: a seeded task with a training loss and a validation metric."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Task", "Workload"]


class Task(abc.ABC):
    """One seeded instance of a workload: its model, data order and held-out data.

    ``train_loss()`` draws the next batch and returns the loss with its graph;
    ``evaluate()`` returns the validation metric as a float (it reads the device: call it
    at the end, not every step).
    """

    model: nn.Module

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    @abc.abstractmethod
    def train_loss(self) -> Tensor: ...

    @abc.abstractmethod
    def evaluate(self) -> float: ...


@dataclass(frozen=True)
class Workload:
    """A named benchmark problem.

    Attributes:
        name: short key used on the command line (``--workloads digits,charlm``).
        title: the table heading.
        metric: what ``Task.evaluate`` returns, with its unit.
        higher_is_better: direction of the metric.
        steps: optimizer steps of a full run; ``quick_steps`` of a ``--quick`` run.
        batch: batch size, for the table heading.
        build: ``(seed, device) -> Task``.
        log_scale: plot the loss curve on a log axis.
    """

    name: str
    title: str
    metric: str
    higher_is_better: bool
    steps: int
    quick_steps: int
    batch: int
    build: type[Task]
    log_scale: bool = False

    def make(self, seed: int, device: torch.device) -> Task:
        return self.build(seed, device)
