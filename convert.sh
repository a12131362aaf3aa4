#!/usr/bin/env bash
# Convert a saved diffusers SDXL pipeline to one single-file checkpoint (original SGM layout, safetensors).
# Usage:
#   MODEL_PATH=runs/my-run/pipelines/epoch-0010 CHECKPOINT_PATH=my-finetune.safetensors ./convert.sh
#   ./convert.sh --dtype bf16 --overwrite          # extra flags are passed through
# Defaults convert the tiny test model (built on first use), which learns nothing: only a smoke test.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-venv/bin/python}"
MODEL_PATH="${MODEL_PATH:-outputs/models/tiny-sdxl}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-outputs/models/tiny-sdxl.safetensors}"
if [ "$MODEL_PATH" = "outputs/models/tiny-sdxl" ] && [ ! -f "$MODEL_PATH/model_index.json" ]; then
  "$PYTHON" -m sdxl_trainer.models.tiny --output "$MODEL_PATH"
fi
"$PYTHON" convert_diffusers_to_original_sdxl.py --model_path "$MODEL_PATH" --checkpoint_path "$CHECKPOINT_PATH" "$@"
