#!/usr/bin/env bash
# diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (as given, or the one-line
# Emo copy from prepare.sh), LoRA on the tiny SD3 pipeline, CPU, offline.
#   WORK=... bash integrations/recipes/sd3_lora.sh RUN_NAME SCRIPT [script args]
# e.g. emosens "$WORK/diffusers-emo/train_dreambooth_lora_sd3.py" --learning_rate 1.0
set -uo pipefail
: "${WORK:?}"
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME="$1"; SCRIPT="$2"; shift 2
RUN="$WORK/runs/$NAME"; rm -rf "$RUN"; mkdir -p "$RUN"
OMP_NUM_THREADS=1 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
    --dynamo_backend no "$HERE/run_offline.py" \
    --path "$WORK/pydeps" --path "$WORK/tvdeps" --trace "$RUN/trace.jsonl" \
    "$SCRIPT" \
    --pretrained_model_name_or_path "$WORK/tiny-sd3" \
    --instance_data_dir "$WORK/digits-images/1_digit" --instance_prompt "a photo of sks digit" \
    --resolution 64 --rank 4 --output_dir "$RUN/out" --train_batch_size 2 \
    --max_train_steps "${STEPS:-300}" --seed 0 --dataloader_num_workers 0 \
    --mixed_precision no --report_to tensorboard --lr_scheduler constant \
    "$@" > "$RUN/stdout.txt" 2>&1
status=$?
python "$HERE/summarize_run.py" "$RUN/out/logs" "$RUN/trace.jsonl" --window "${WINDOW:-50}" | tee "$RUN/summary.json"
exit $status
