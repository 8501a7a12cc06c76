"""LoRA fine-tuning of a pretrained character-level transformer to a new kind of text.

The base model is the char-LM transformer (2 layers, 64 wide), pretrained once per process
and deterministically (seed 0, AdamW 3e-3, ``PRETRAIN_STEPS`` steps; cached in memory) on
Python standard-library *source code*. Each run freezes it and trains rank-4 low-rank
adapters (:class:`LoRALinear`, written here: ``y = W·x + (α/r)·B·A·x`` with ``B = 0`` at the
start, so a run starts exactly at the pretrained model) on every attention and MLP
projection, on 16k characters of English *prose* (the help topics in ``pydoc_data``, also
shipped with Python). Metric: validation bits per character on held-out prose. Too large a
step throws the base model's knowledge away (and overfits the small set), too small a step
does not adapt: the diffusion / LLM LoRA use case in miniature.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task, Workload
from .charlm import CONTEXT, MAX_CHARS, MODULES, CharTransformer

__all__ = ["LORA", "LoRALinear", "add_lora", "load_corpora", "pretrained_char_lm"]

BATCH = 16
RANK = 4
ALPHA = 8.0
FINETUNE_CHARS = 16_000
VAL_WINDOWS = 64
PRETRAIN_STEPS = 400
PRETRAIN_LR = 3e-3


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(α/r)·B·A``."""

    def __init__(self, base: nn.Linear, rank: int = RANK, alpha: float = ALPHA) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.a = nn.Parameter(torch.empty(rank, base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.a), self.b)


def add_lora(model: nn.Module, rank: int = RANK, alpha: float = ALPHA) -> list[Tensor]:
    """Freeze ``model``, wrap every ``nn.Linear`` except the output head; the adapter params."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name != "head":
                setattr(module, name, LoRALinear(child, rank, alpha))
    return [p for p in model.parameters() if p.requires_grad]


@functools.cache
def load_corpora() -> tuple[Tensor, Tensor, Tensor, int]:
    """``(source_ids, finetune_ids, val_ids, vocab)``: code for pretraining, prose to adapt to."""
    import importlib
    import inspect
    import pydoc_data.topics

    code = "\n".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)
    code = code[:MAX_CHARS]
    topics = pydoc_data.topics.topics
    prose = "\n".join(topics[k] for k in sorted(topics))
    vocab = sorted(set(code) | set(prose))
    index = {ch: i for i, ch in enumerate(vocab)}

    def ids(text: str) -> Tensor:
        return torch.tensor([index[ch] for ch in text], dtype=torch.int64)

    finetune = ids(prose[:FINETUNE_CHARS])
    val = ids(prose[len(prose) // 2 : len(prose) // 2 + 40_000])
    return ids(code), finetune, val, len(vocab)


def _windows(ids: Tensor, gen: torch.Generator, batch: int) -> Tensor:
    starts = torch.randint(len(ids) - CONTEXT - 1, (batch,), generator=gen)
    return ids[starts[:, None] + torch.arange(CONTEXT + 1)]


def _lm_loss(model: nn.Module, windows: Tensor) -> Tensor:
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@functools.cache
def pretrained_char_lm(steps: int = PRETRAIN_STEPS) -> dict[str, Tensor]:
    """State dict of the char transformer after ``steps`` of AdamW on source code (seed 0)."""
    code, _, _, vocab = load_corpora()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CharTransformer(vocab)
        opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            loss = _lm_loss(model, _windows(code, gen, BATCH))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class LoRATask(Task):
    def __init__(self, seed: int, device: torch.device) -> None:
        _, finetune, val, vocab = load_corpora()
        base = pretrained_char_lm(PRETRAIN_STEPS)  # read at call time: tests shorten it
        torch.manual_seed(seed)
        self.model = CharTransformer(vocab)
        self.model.load_state_dict(base)
        self.adapters = add_lora(self.model)
        self.model.to(device)
        self.finetune = finetune.to(device)
        self.gen = torch.Generator().manual_seed(seed)
        starts = torch.linspace(0, len(val) - CONTEXT - 2, VAL_WINDOWS).long()
        self.val_windows = torch.stack([val[s : s + CONTEXT + 1] for s in starts]).to(device)

    def parameters(self) -> list[Tensor]:
        return list(self.adapters)

    def train_loss(self) -> Tensor:
        windows = _windows(self.finetune.cpu(), self.gen, BATCH).to(self.finetune.device)
        return _lm_loss(self.model, windows)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        try:
            return float(_lm_loss(self.model, self.val_windows)) / math.log(2.0)
        finally:
            self.model.train()


LORA = Workload(
    name="lora",
    title="LoRA (rank 4) on a char transformer pretrained on code, adapted to English prose",
    metric="val bits/char",
    higher_is_better=False,
    steps=200,
    quick_steps=40,
    batch=BATCH,
    build=LoRATask,
)
