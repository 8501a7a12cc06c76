"""Every ```python block of README.md runs, each in its own process with a fresh working
directory, or is marked ``<!-- not run: reason -->`` on the line right before it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the reason, when marked


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a markdown text, with their not-run markers."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            if i == len(lines):
                raise ValueError(f"README.md:{start + 1}: unclosed ```python block")
            marker = NOT_RUN.match(lines[start - 1].strip()) if start else None
            reason = marker.group(1).strip() if marker else None
            blocks.append(Block(start + 1, "\n".join(lines[start + 1 : i]) + "\n", reason))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_block_finder_reads_markers_and_code() -> None:
    text = "a\n```python\nx = 1\n```\n<!-- not run: needs a GPU -->\n```python\ny\n```\n"
    first, second = python_blocks(text)
    assert (first.line, first.code, first.not_run) == (2, "x = 1\n", None)
    assert (second.line, second.not_run) == (6, "needs a GPU")
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_python_block_runs(block: Block, tmp_path: Path) -> None:
    if block.not_run is not None:
        assert block.not_run, f"README.md:{block.line}: a not-run marker needs a reason"
        pytest.skip(f"marked not run: {block.not_run}")
    script = tmp_path / f"readme_line_{block.line}.py"
    script.write_text(block.code)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"README.md:{block.line} failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
    )


def test_readme_lora_load_call_works_on_a_saved_lora(tmp_path: Path, monkeypatch) -> None:
    """The ``load_lora_adapter`` call the README shows, on a LoRA written by ``save_lora``."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import torch
    from diffusers import SD3Transformer2DModel

    from emo_diffusers.lora import add_lora, save_lora
    from emo_diffusers.models import TINY_CONFIGS

    calls = re.findall(r"`(transformer\.load_lora_adapter\([^`]*\))`", README.read_text())
    assert calls, "README.md shows no transformer.load_lora_adapter(...) call"
    trained = SD3Transformer2DModel(**TINY_CONFIGS["sd3"])
    add_lora(trained, rank=2)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.normal_()
    monkeypatch.chdir(tmp_path)
    save_lora(trained, "sd3", "out/lora")
    saved = {k.replace(".default", ""): v for k, v in trained.state_dict().items() if "lora" in k}
    for call in calls:
        transformer = SD3Transformer2DModel(**TINY_CONFIGS["sd3"])
        eval(call, {"transformer": transformer})  # the README's exact text
        loaded = {
            k.replace(".default_0", ""): v
            for k, v in transformer.state_dict().items()
            if "lora" in k
        }
        assert loaded.keys() == saved.keys(), call
        assert all(torch.equal(loaded[k], saved[k]) for k in saved), call
