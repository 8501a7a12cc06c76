"""Emo optimizers for the Hugging Face ``Trainer``: ``--optim emosens|emoairy|emocats``.

```python
from emo_hf import EmoTrainer, EmoTrainingArguments

args = EmoTrainingArguments(output_dir="out", optim="emosens", gradient_accumulation_steps=4)
trainer = EmoTrainer(model=model, args=args, train_dataset=ds)
trainer.train()
```
"""

from emo_core.extras import require_extra

require_extra("emo_hf", "hf", "transformers", "accelerate")

from .arguments import (  # noqa: E402
    EMO_OPTIM_NAMES,
    EmoArgumentsMixin,
    EmoTrainingArguments,
    canonical_optim_name,
    emo_arguments,
    emo_optim_name,
)
from .optim_args import optimizer_keywords, parse_optim_args  # noqa: E402
from .trainer import EmoTrainer, EmoTrainerMixin  # noqa: E402

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
