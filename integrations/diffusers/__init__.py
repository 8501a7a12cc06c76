"""emo_diffusers: LoRA flow-matching fine-tuning of SD3/Flux transformers with Emo optimizers.

The entry point is a script, ``python -m emo_diffusers.train_lora_flow --config ...``
(see ``train_lora_flow.py``); its parts are small modules that can be reused:

* ``flow_matching``: rectified-flow sigmas, noise, targets and loss weights (pure functions);
* ``models``: the tiny "pretrained" base (save_pretrained / from_pretrained) and one forward
  for SD3 and Flux; ``conditioning``: the learned class embedding that replaces text encoders;
* ``lora``: peft LoRA on the transformer, saved in diffusers' format;
* ``data``: offline images, a lossless pixel "VAE", a step-indexed batch order;
* ``optimizers``: the ``--optimizer`` table; ``checkpointing``: trainable-only checkpoints;
* ``sampling``: Euler flow sampling and the PNG grid; ``history``: loss/LR curve.

Importing the package imports nothing from diffusers, peft or accelerate.
"""

__all__: list[str] = []
