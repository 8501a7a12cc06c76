"""A missing optional dependency named with the extra that installs it.

The adapters (``emo_lightning``, ``emo_hf``, ``emo_diffusers``) and ``emo_bench`` need
packages that a plain ``pip install emo-optim`` does not bring; without them a bare
``No module named 'lightning'`` says nothing about how to get them.
"""

from __future__ import annotations

import importlib.util

__all__ = ["require_extra"]


def require_extra(who: str, extra: str, *modules: str) -> None:
    """Raise ``ImportError`` naming ``pip install 'emo-optim[extra]'`` if any of ``modules``
    (import names) is not installed; imports nothing itself."""
    missing = [name for name in modules if not _installed(name)]
    if missing:
        raise ImportError(
            f"{who} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'emo-optim[{extra}]'"
        )


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # (a module set to None in sys.modules: blocked)
        return False
