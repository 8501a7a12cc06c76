"""``EmoSensScheduleFree``: averaged EmoSens under the name schedule-free-aware scripts know.

Training scripts recognise a Schedule-Free optimizer by its name: kohya-ss sd-scripts, for
one, treats every ``--optimizer_type`` that ends in ``ScheduleFree`` as one, calls its
``train()``/``eval()`` around sampling, validation and saving (so the saved model is the
average ``x``) and replaces its LR scheduler by a constant one. This class is
``EmoSens(pulse="distance", average=True)`` with that name and Schedule-Free's default of no
weight decay (below); its state is EmoSens's, so a checkpoint of either loads into the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .emosens import EmoSens

__all__ = ["EmoSensScheduleFree"]


class EmoSensScheduleFree(EmoSens):
    """:class:`~emo_core.EmoSens` with ``pulse="distance", average=True`` fixed
    (``emo_core/averaging.md``): call ``opt.train()`` before training steps and
    ``opt.eval()`` before evaluating or saving. The other arguments are EmoSens's
    (``use_shadow`` excepted, which averaging excludes), except that ``weight_decay``
    defaults to 0, as in Schedule-Free AdamW and Prodigy + Schedule-Free: the LR that
    averaging finds is large (0.26 on emo-bench's quadratic, ~1e-2 elsewhere), and the decay
    ``lr·weight_decay`` grows with it (``averaging.md``, "Weight decay")."""

    state_owner = "EmoSens"  # the state layout (and the name checked on load) is EmoSens's

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.995),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        min_lr: float | None = None,
        max_lr: float | None = None,
        sync_loss: bool = True,
        process_group: object | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        compile_update: bool = False,
        writer: Any | None = None,
        log_every: int = 1,
        maximize: bool = False,
        capture_loss: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            pulse="distance",
            average=True,
            min_lr=min_lr,
            max_lr=max_lr,
            sync_loss=sync_loss,
            process_group=process_group,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            foreach=foreach,
            fused=fused,
            compile_update=compile_update,
            writer=writer,
            log_every=log_every,
            maximize=maximize,
            capture_loss=capture_loss,
        )
