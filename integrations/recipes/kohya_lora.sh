#!/usr/bin/env bash
# sd-scripts' train_network.py, unmodified, LoRA on the tiny SD1.x model, CPU, offline.
#   WORK=... SD_SCRIPTS=... bash integrations/recipes/kohya_lora.sh RUN_NAME [train_network.py args]
# e.g. RUN_NAME=emosens  --optimizer_type emo_core.EmoSens --optimizer_args capture_loss=True --learning_rate 1.0
set -uo pipefail
: "${WORK:?}" "${SD_SCRIPTS:?}"
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME="$1"; shift
RUN="$WORK/runs/$NAME"; rm -rf "$RUN"; mkdir -p "$RUN"
OMP_NUM_THREADS=1 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
    --dynamo_backend no "$HERE/run_offline.py" \
    --path "$WORK/pydeps" --path "$WORK/tvdeps" --trace "$RUN/trace.jsonl" \
    "$SD_SCRIPTS/train_network.py" \
    --pretrained_model_name_or_path "$WORK/tiny-sd15" \
    --tokenizer_cache_dir "$WORK/tiny-sd15/tokenizer_cache" \
    --train_data_dir "$WORK/digits" --caption_extension .txt --resolution 64 \
    --network_module networks.lora --network_dim 4 --network_alpha 4 \
    --output_dir "$RUN/out" --output_name lora --save_model_as safetensors \
    --train_batch_size 2 --max_train_steps "${STEPS:-200}" --seed 0 \
    --max_data_loader_n_workers 0 --mixed_precision no \
    --log_with tensorboard --logging_dir "$RUN/logs" "$@" > "$RUN/stdout.txt" 2>&1
status=$?
python "$HERE/summarize_run.py" "$RUN/logs" "$RUN/trace.jsonl" --window "${WINDOW:-20}" | tee "$RUN/summary.json"
exit $status
