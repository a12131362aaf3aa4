#!/usr/bin/env bash
# Convert a saved diffusers SDXL pipeline to one single-file checkpoint (original SGM layout, safetensors).
# With no edits it converts train.sh's final model (outputs/sample_dataset/final: run ./train.sh first).
# Usage:
#   MODEL_PATH=runs/my-run/epoch-10 CHECKPOINT_PATH=my-finetune.safetensors ./convert.sh
#   ./convert.sh --dtype bf16 --overwrite          # extra flags are passed through
# A run saves its pipelines as <output_dir>/epoch-<N> and <output_dir>/final (see docs/training.md).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-venv/bin/python}"
MODEL_PATH="${MODEL_PATH:-outputs/sample_dataset/final}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-outputs/sample_dataset/final.safetensors}"
if [ ! -f "$MODEL_PATH/model_index.json" ]; then
  echo "error: MODEL_PATH=$MODEL_PATH is not a saved pipeline (no model_index.json); run ./train.sh first or set MODEL_PATH" >&2
  exit 1
fi
"$PYTHON" convert_diffusers_to_original_sdxl.py --model_path "$MODEL_PATH" --checkpoint_path "$CHECKPOINT_PATH" "$@"
