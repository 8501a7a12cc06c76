#!/usr/bin/env bash
# Every row of the README's "Drop-in" tables, then the summaries into results/.
#   WORK=... SD_SCRIPTS=... DIFFUSERS=... bash integrations/recipes/run_all.sh   (after prepare.sh)
set -uo pipefail
: "${WORK:?}" "${SD_SCRIPTS:?}" "${DIFFUSERS:?}"
HERE="$(cd "$(dirname "$0")" && pwd)"
EMO=(--optimizer_type emo_core.EmoSens)
bash "$HERE/kohya_lora.sh" emosens-capture "${EMO[@]}" --optimizer_args capture_loss=True --learning_rate 1.0
bash "$HERE/kohya_lora.sh" emosens-nocapture "${EMO[@]}" --learning_rate 1.0
bash "$HERE/kohya_lora.sh" emosens-capture-maxlr1e-2 "${EMO[@]}" --optimizer_args capture_loss=True max_lr=1e-2 --learning_rate 1.0
bash "$HERE/kohya_lora.sh" emosens-capture-1e-4 "${EMO[@]}" --optimizer_args capture_loss=True --learning_rate 1e-4
# the distance controller (sd-scripts literal-evals the values: quote the string), and the
# averaged one under the name sd-scripts treats as Schedule-Free (needs `schedulefree`
# importable, as in sd-scripts' requirements)
bash "$HERE/kohya_lora.sh" emosens-distance "${EMO[@]}" --optimizer_args capture_loss=True 'pulse="distance"' --learning_rate 1.0
bash "$HERE/kohya_lora.sh" emosens-schedulefree --optimizer_type emo_core.EmoSensScheduleFree --optimizer_args capture_loss=True --learning_rate 1.0
bash "$HERE/kohya_lora.sh" prodigy-schedulefree --optimizer_type prodigyplus.ProdigyPlusScheduleFree --learning_rate 1.0
for lr in 1e-4 1e-3 1e-2; do
    bash "$HERE/kohya_lora.sh" "adamw-$lr" --optimizer_type AdamW --learning_rate "$lr"
done
ORIGINAL="$DIFFUSERS/examples/dreambooth/train_dreambooth_lora_sd3.py"
bash "$HERE/sd3_lora.sh" sd3-emosens-capture "$WORK/diffusers-emo/train_dreambooth_lora_sd3.py" --learning_rate 1.0
for lr in 1e-4 1e-3 1e-2; do
    bash "$HERE/sd3_lora.sh" "sd3-adamw-$lr" "$ORIGINAL" --learning_rate "$lr"
done
mkdir -p "$HERE/results"
for run in "$WORK"/runs/*/; do
    cp "$run/summary.json" "$HERE/results/$(basename "$run").json"
done
