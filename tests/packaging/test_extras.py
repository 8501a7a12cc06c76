"""A missing optional dependency is named with the extra that installs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from emo_core.extras import require_extra

ROOT = Path(__file__).resolve().parents[2]


def test_require_extra_names_the_missing_module_and_the_pip_command() -> None:
    require_extra("emo_core", "hf", "torch")  # installed: nothing happens
    with pytest.raises(
        ImportError,
        match=r"needs no_such_module_x, which is not installed: "
        r"pip install 'emo-optim\[bench\]'",
    ):
        require_extra("emo-bench", "bench", "torch", "no_such_module_x")


@pytest.mark.parametrize(
    ("package", "blocked", "extra"),
    [
        ("emo_lightning", "lightning", "lightning"),
        ("emo_hf", "transformers", "hf"),
        ("emo_bench", "tqdm", "bench"),
    ],
)
def test_importing_an_adapter_without_its_dependency_says_which_extra(
    package: str, blocked: str, extra: str
) -> None:
    code = f"import sys; sys.modules[{blocked!r}] = None; import {package}"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode != 0
    assert f"pip install 'emo-optim[{extra}]'" in result.stderr.splitlines()[-1]
