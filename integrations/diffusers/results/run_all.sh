#!/usr/bin/env bash
# The runs behind results/README.md: the shipped tiny SD3 config (base pretrained on digits 0-4
# once, cached; bf16 LoRA on 5-9), per optimizer at its defaults, AdamW at the scripts' 1e-4
# and an LR sweep, EmoSens with round-to-nearest; then compare.py. Usage: run_all.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${1:-out/diffusers_results}
PY=${PYTHON:-.venv/bin/python}
CACHE=${CACHE:-$OUT/.emo_cache}
run() {
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && return 0  # done already
  nice -n 5 $PY -m emo_diffusers.train_lora_flow --config configs/diffusers/tiny_sd3_lora.yaml \
    --cache_dir "$CACHE" --disable_progress_bar --report_to none --checkpointing_steps 0 \
    --output_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: $(grep -o '"sample_accuracy_lora": [0-9.]*' "$OUT/$name/metrics.json")"
}
mkdir -p "$OUT"
run sd3_emosens --optimizer emosens
run sd3_adamw_1e-4 --optimizer adamw --learning_rate 1e-4
run sd3_prodigy --optimizer prodigy
run sd3_emoairy --optimizer emoairy
run sd3_emocats --optimizer emocats
run sd3_emosens_nearest --optimizer emosens --no-stochastic_rounding
for lr in 1e-3 3e-3 3e-4; do run "sd3_adamw_$lr" --optimizer adamw --learning_rate "$lr"; done
R=integrations/diffusers/results
$PY $R/compare.py $(ls -d "$OUT"/sd3_*/ | sed 's:/$::') \
  --png "$R/sd3_bf16_optimizers.png" --md "$R/sd3_bf16_optimizers.md"
