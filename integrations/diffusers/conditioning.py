"""A learned class embedding in place of text encoders.

SD3 and Flux transformers are conditioned on two text-encoder outputs: a token sequence
(``encoder_hidden_states``, ``[B, T, joint_attention_dim]``) and a pooled vector
(``pooled_projections``, ``[B, pooled_projection_dim]``). Offline there are no text
encoders to download, so each class (digit) gets its own learned "prompt": ``num_tokens``
token vectors and one pooled vector, looked up by label. It plays the part of the learned
token embeddings of textual inversion: small, trained together with the LoRA (unless
``--no-train_conditioner``), and saved next to it (``class_conditioner.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

__all__ = ["CONDITIONER_WEIGHT_NAME", "ClassConditioner", "load_conditioner", "save_conditioner"]

CONDITIONER_WEIGHT_NAME = "class_conditioner.safetensors"


class ClassConditioner(nn.Module):
    """Per-class prompt embeddings shaped as the transformer expects.

    Args:
        num_classes: number of labels.
        num_tokens: length of each class's token sequence.
        token_dim: the transformer's ``joint_attention_dim``.
        pooled_dim: the transformer's ``pooled_projection_dim``.
    """

    def __init__(self, num_classes: int, num_tokens: int, token_dim: int, pooled_dim: int) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("num_tokens", num_tokens),
            ("token_dim", token_dim),
            ("pooled_dim", pooled_dim),
        ):
            if value < 1:
                raise ValueError(f"Invalid {name}: {value} (expected an integer >= 1)")
        self.num_tokens = num_tokens
        self.token_dim = token_dim
        # Unit-variance init, like the normalised outputs of a text encoder.
        self.tokens = nn.Embedding(num_classes, num_tokens * token_dim)
        self.pooled = nn.Embedding(num_classes, pooled_dim)

    @property
    def num_classes(self) -> int:
        return self.tokens.num_embeddings

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(encoder_hidden_states [B, T, D], pooled_projections [B, P])`` for ``labels``."""
        tokens = self.tokens(labels).view(labels.shape[0], self.num_tokens, self.token_dim)
        return tokens, self.pooled(labels)

    def config(self) -> dict[str, int]:
        """Constructor arguments, to rebuild the module before loading its weights."""
        return {
            "num_classes": self.num_classes,
            "num_tokens": self.num_tokens,
            "token_dim": self.token_dim,
            "pooled_dim": self.pooled.embedding_dim,
        }


def save_conditioner(conditioner: ClassConditioner, directory: str | Path) -> Path:
    """Write the weights (in their dtype) and config to ``directory/class_conditioner.safetensors``."""
    from safetensors.torch import save_file

    path = Path(directory) / CONDITIONER_WEIGHT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in conditioner.state_dict().items()}
    save_file(tensors, path, metadata={"config": json.dumps(conditioner.config())})
    return path


def load_conditioner(directory: str | Path) -> ClassConditioner:
    """Rebuild a ``ClassConditioner`` saved by ``save_conditioner`` (same dtype as saved)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(directory) / CONDITIONER_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONDITIONER_WEIGHT_NAME} in {str(directory)!r}; pass the output_dir of a "
            "train_lora_flow run"
        )
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
    state = load_file(path)
    conditioner = ClassConditioner(**config).to(next(iter(state.values())).dtype)
    conditioner.load_state_dict(state)
    return conditioner
