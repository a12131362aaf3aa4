#!/usr/bin/env bash
# Train the SDXL UNet with FSDP2 FULL_SHARD from a latent cache: the project's main recipe.
#
# With no edits it runs the whole chain on sample_dataset/ with the tiny random-weight model (it learns
# nothing meaningful): build models/tiny-sdxl if missing, cache the images (sdxl_process_data_dir.sh), then
# train a few epochs on every GPU, or on 2 CPU processes over gloo when there is no GPU.
# Real use, e.g. SDXL base on 8 GPUs:
#   MODEL=/models/sdxl-base DATA_DIR=/data/photos CACHE_DIR=/data/cache OUTPUT_DIR=runs/photos NUM_PROCESSES=8 \
#     ./train.sh --train_batch_size 8 --num_train_epochs 20 --learning_rate 1e-5
# Prodigy (the step size estimated from the run; --learning_rate multiplies it):
#     ./train.sh --optimizer prodigy --learning_rate 1.0 --prodigy_use_bias_correction --prodigy_safeguard_warmup
# Every extra flag is passed to sdxl_fsdp_train.py ("$@": later flags win); see docs/training.md.
# Interrupted? Run the same command again: --resume_from_checkpoint auto continues from the newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-venv/bin/python}
MODEL=${MODEL:-models/tiny-sdxl}
DATA_DIR=${DATA_DIR:-sample_dataset}
CACHE_DIR=${CACHE_DIR:-cache}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sample_dataset}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [[ "$GPUS" -gt 0 ]]; then
    NUM_PROCESSES=${NUM_PROCESSES:-$GPUS}
    PRECISION=${PRECISION:-bf16}
else
    NUM_PROCESSES=${NUM_PROCESSES:-2}   # CPU processes over gloo: the same sharding code as on GPUs
    PRECISION=${PRECISION:-no}          # bf16 matmuls are slow on most CPUs
fi

if [[ "$MODEL" == "models/tiny-sdxl" && ! -d "$MODEL" ]]; then
    "$PYTHON" -m sdxl_trainer.models.tiny --output "$MODEL"
fi
# Caching is incremental: unchanged images are reused, so this is quick on a second run.
DATA_DIR="$DATA_DIR" CACHE_DIR="$CACHE_DIR" MODEL="$MODEL" PYTHON="$PYTHON" ./sdxl_process_data_dir.sh

"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_PROCESSES" sdxl_fsdp_train.py \
    --pretrained_model_name_or_path "$MODEL" \
    --cached_dataset_dirs "$CACHE_DIR" \
    --data_dir "$DATA_DIR" \
    --output_dir "$OUTPUT_DIR" \
    --mixed_precision "$PRECISION" \
    --train_batch_size 1 \
    --gradient_accumulation_steps 2 \
    --num_train_epochs 3 \
    --learning_rate 1e-4 \
    --learning_rate_scheduler cosine \
    --percent_lr_warm_up_steps 0.1 \
    --validation_loss --validation_loss_percent 0.1 --validation_loss_every_n_epochs 1 \
    --save_samples --num_sample_images 4 --sample_steps 8 --save_samples_every_n_epochs 1 \
    --save_model_every_n_epochs 3 \
    --checkpointing_steps 10 --checkpoints_total_limit 2 \
    --resume_from_checkpoint auto \
    "$@"
