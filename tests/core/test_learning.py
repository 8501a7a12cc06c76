"""Each optimizer at lr=1.0 and default settings learns sklearn digits with a small MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.core.cases import NAMES, OPTIMIZERS

sklearn_datasets = pytest.importorskip("sklearn.datasets")

STEPS = 300
THRESHOLD = 0.5  # full-data cross-entropy; it starts near ln(10) = 2.3


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def train_digits(
    name: str, seed: int, steps: int = STEPS, dtype: torch.dtype = torch.float32, **kwargs
) -> float:
    """Train a 64-64-10 MLP for ``steps`` minibatch steps; return the full-data loss."""
    x, y = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)
    opt = OPTIMIZERS[name](model.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[index].to(dtype)).float(), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x.to(dtype)).float(), y))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_learns_digits_at_default_settings(name: str, seed: int) -> None:
    final = train_digits(name, seed)
    assert final < THRESHOLD, final
