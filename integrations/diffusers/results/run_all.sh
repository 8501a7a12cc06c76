#!/usr/bin/env bash
# The runs behind results/README.md: 300 bf16 steps of the tiny SD3 config per optimizer,
# emosens without stochastic rounding, and the tiny Flux config. Usage: run_all.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${1:-out/diffusers_results}
PY=${PYTHON:-.venv/bin/python}
run() {
  local config=$1 name=$2; shift 2
  $PY -m emo_diffusers.train_lora_flow --config "configs/diffusers/$config" \
    --mixed_precision bf16 --max_train_steps 300 --disable_progress_bar \
    --output_dir "$OUT/$name" "$@"
}
run tiny_sd3_lora.yaml sd3_emosens --optimizer emosens
run tiny_sd3_lora.yaml sd3_adamw --optimizer adamw --learning_rate 1e-4
run tiny_sd3_lora.yaml sd3_prodigy --optimizer prodigy
run tiny_sd3_lora.yaml sd3_emosens_nearest --optimizer emosens --no-stochastic_rounding
run tiny_flux_lora.yaml flux_emosens --optimizer emosens
$PY integrations/diffusers/results/compare.py "$OUT"/sd3_emosens "$OUT"/sd3_adamw \
  "$OUT"/sd3_prodigy "$OUT"/sd3_emosens_nearest "$OUT"/flux_emosens \
  --png "$OUT/optimizers.png"
