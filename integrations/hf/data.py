"""Offline demo data for ``emo_hf.train``: stdlib docstrings, a byte tokenizer, LM blocks.

No hub and no download: the text is the docstrings of a fixed list of Python standard
library modules (English prose that ships with every Python), and the tokenizer is
transformers' byte-level ``ByT5Tokenizer`` built locally (256 bytes + pad/eos/unk, no
vocabulary file), so ``save_pretrained``/``from_pretrained`` round-trip through a folder.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import torch
from torch.utils.data import Dataset
from transformers import ByT5Tokenizer, PreTrainedTokenizerBase

__all__ = ["STDLIB_MODULES", "LMBlocks", "build_byte_tokenizer", "split_blocks", "stdlib_text"]

STDLIB_MODULES: tuple[str, ...] = (
    "argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "re",
    "textwrap", "typing", "unittest", "dataclasses", "inspect", "string", "heapq", "bisect",
    "random", "statistics", "fractions", "decimal",
)  # fmt: skip


def build_byte_tokenizer() -> ByT5Tokenizer:
    """A byte-level tokenizer (vocabulary 259: pad=0, eos=1, unk=2, then the 256 bytes)."""
    return ByT5Tokenizer(extra_ids=0)


def stdlib_text(max_chars: int | None = None, modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """Docstrings of ``modules`` and their public members, in a fixed order."""
    pieces: list[str] = []
    with warnings.catch_warnings():  # e.g. typing.io's DeprecationWarning on access
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in modules:
            module = importlib.import_module(module_name)
            pieces.append(inspect.getdoc(module) or "")
            for name, member in vars(module).items():
                if name.startswith("_") or getattr(member, "__module__", None) != module_name:
                    continue
                pieces.append(inspect.getdoc(member) or "")
    text = "\n\n".join(p for p in pieces if p)
    return text if max_chars is None else text[:max_chars]


class LMBlocks(Dataset):
    """Consecutive ``block_size`` token blocks for causal LM training (labels = inputs)."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        if block_size < 2:
            raise ValueError(f"Invalid block_size: {block_size} (expected >= 2)")
        count = ids.numel() // block_size
        if count == 0:
            raise ValueError(
                f"Invalid block_size: {block_size} exceeds the {ids.numel()} tokens available; "
                "lower block_size or raise max_chars"
            )
        self.blocks = ids[: count * block_size].view(count, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}


def split_blocks(
    text: str, tokenizer: PreTrainedTokenizerBase, block_size: int, validation_fraction: float
) -> tuple[LMBlocks, LMBlocks | None]:
    """Tokenize ``text`` and cut it into train blocks and (the tail) validation blocks."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"Invalid validation_fraction: {validation_fraction} (expected [0, 1))")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    cut = int(ids.numel() * (1.0 - validation_fraction))
    train = LMBlocks(ids[:cut], block_size)
    validation = LMBlocks(ids[cut:], block_size) if validation_fraction > 0 else None
    return train, validation
