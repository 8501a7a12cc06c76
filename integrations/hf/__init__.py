"""Emo optimizers for the Hugging Face ``Trainer``: ``--optim emosens|emoairy|emocats``.

```python
from emo_hf import EmoTrainer, EmoTrainingArguments

args = EmoTrainingArguments(output_dir="out", optim="emosens", gradient_accumulation_steps=4)
trainer = EmoTrainer(model=model, args=args, train_dataset=ds)
trainer.train()
```
"""

try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "emo_hf needs transformers and accelerate: pip install 'emo-optim[hf]'"
    ) from error

from .arguments import (
    EMO_OPTIM_NAMES,
    EmoArgumentsMixin,
    EmoTrainingArguments,
    canonical_optim_name,
    emo_arguments,
    emo_optim_name,
)
from .optim_args import optimizer_keywords, parse_optim_args
from .trainer import EmoTrainer, EmoTrainerMixin

__all__ = [
    "EMO_OPTIM_NAMES",
    "EmoArgumentsMixin",
    "EmoTrainer",
    "EmoTrainerMixin",
    "EmoTrainingArguments",
    "canonical_optim_name",
    "emo_arguments",
    "emo_optim_name",
    "optimizer_keywords",
    "parse_optim_args",
]
