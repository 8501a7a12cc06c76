"""Tiny character-level transformer language model on Python standard-library source text.

The text is the source of a few stdlib modules (read with ``inspect.getsource``: offline and
identical on every machine with the same Python); the first 90% trains, the last 10%
validates. A 2-layer, 64-wide causal transformer over 64-character windows. Metric:
validation cross-entropy in bits per character over fixed windows.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task, Workload

__all__ = ["CHARLM", "load_corpus"]

MODULES = ("textwrap", "difflib", "argparse")
MAX_CHARS = 200_000
CONTEXT = 64
BATCH = 16
WIDTH = 64
LAYERS = 2
HEADS = 4
VAL_WINDOWS = 64


@functools.cache
def load_corpus() -> tuple[Tensor, Tensor, int]:
    """``(train_ids, val_ids, vocab_size)`` from stdlib module sources."""
    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)
    text = text[:MAX_CHARS]
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(vocab)


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, WIDTH)
        self.pos = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        self.blocks = nn.Sequential(*(Block(WIDTH, HEADS) for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        return self.head(self.norm(self.blocks(x)))


class CharLMTask(Task):
    def __init__(self, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        train, val, vocab = load_corpus()
        self.model = CharTransformer(vocab).to(device)
        self.train_ids = train.to(device)
        self.gen = torch.Generator().manual_seed(seed)
        starts = torch.linspace(0, len(val) - CONTEXT - 2, VAL_WINDOWS).long()
        self.val_windows = torch.stack([val[s : s + CONTEXT + 1] for s in starts]).to(device)

    def _loss(self, windows: Tensor) -> Tensor:
        logits = self.model(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

    def train_loss(self) -> Tensor:
        starts = torch.randint(len(self.train_ids) - CONTEXT - 1, (BATCH,), generator=self.gen)
        offsets = torch.arange(CONTEXT + 1)
        windows = self.train_ids[(starts[:, None] + offsets).to(self.train_ids.device)]
        return self._loss(windows)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        try:
            return float(self._loss(self.val_windows)) / math.log(2.0)
        finally:
            self.model.train()


CHARLM = Workload(
    name="charlm",
    title="Char-level transformer LM (stdlib source text, 2x64, context 64)",
    metric="val bits/char",
    higher_is_better=False,
    steps=500,
    quick_steps=120,
    batch=BATCH,
    build=CharLMTask,
)
