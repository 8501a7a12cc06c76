#!/usr/bin/env bash
# Prepare the drop-in runs offline, outside the project: extra packages in --target dirs,
# the tiny SD1.x and SD3 pipelines, the digit images, and the one-line Emo swap applied to
# a copy of the diffusers SD3 LoRA example.
#   WORK=/tmp/dropin SD_SCRIPTS=~/src/sd-scripts DIFFUSERS=~/src/diffusers \
#       bash integrations/recipes/prepare.sh
set -euo pipefail
: "${WORK:?set WORK to a scratch folder}" "${SD_SCRIPTS:?sd-scripts checkout}" "${DIFFUSERS:?diffusers checkout}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python}"
mkdir -p "$WORK"
# sd-scripts' imports beyond a diffusers environment (not its requirements.txt: it pins old
# transformers/diffusers/accelerate); torchvision apart, so only the training process sees it.
"$PY" -m pip install -q --no-deps --target "$WORK/pydeps" \
    toml voluptuous einops opencv-python-headless imagesize ftfy wcwidth sentencepiece
"$PY" -m pip install -q --no-deps --target "$WORK/tvdeps" "torchvision==0.28.0"
"$PY" "$HERE/tiny_models.py" sd15 "$WORK/tiny-sd15"
"$PY" "$HERE/tiny_models.py" sd3 "$WORK/tiny-sd3"
"$PY" "$HERE/tiny_data.py" "$WORK/digits" --count 8
"$PY" "$HERE/tiny_data.py" "$WORK/digits-images" --count 8 --no-captions
# The one-line swap: the script's AdamW class becomes EmoSens with capture_loss=True.
mkdir -p "$WORK/diffusers-emo"
sed 's|^            optimizer_class = torch.optim.AdamW$|            optimizer_class = lambda params, **kwargs: __import__("emo_core").EmoSens(params, capture_loss=True, **kwargs)|' \
    "$DIFFUSERS/examples/dreambooth/train_dreambooth_lora_sd3.py" > "$WORK/diffusers-emo/train_dreambooth_lora_sd3.py"
diff "$DIFFUSERS/examples/dreambooth/train_dreambooth_lora_sd3.py" \
    "$WORK/diffusers-emo/train_dreambooth_lora_sd3.py" || true
