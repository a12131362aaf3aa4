#!/usr/bin/env bash
# Cache a dataset (VAE latents + text embeddings per aspect bucket) for sdxl_fsdp_train.py.
# With no edits it caches sample_dataset/ with the tiny random-weight model (built into models/tiny-sdxl
# if missing), on CPU when there is no GPU. Real use, e.g. 8 GPUs:
#   DATA_DIR=/data/photos CACHE_DIR=/data/cache MODEL=/models/sdxl-base NUM_PROCESSES=8 ./sdxl_process_data_dir.sh
# Any extra flag is passed through ("$@"), e.g. --vae /models/sdxl-vae-fp16-fix --batch_size 32;
# see `python sdxl_process_data_dir.py --help` and docs/caching.md.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-venv/bin/python}
DATA_DIR=${DATA_DIR:-sample_dataset}
CACHE_DIR=${CACHE_DIR:-cache}
MODEL=${MODEL:-models/tiny-sdxl}
MIN_RESOLUTION=${MIN_RESOLUTION:-256}
MAX_RESOLUTION=${MAX_RESOLUTION:-1024}
NUM_PROCESSES=${NUM_PROCESSES:-1}

if [[ "$MODEL" == "models/tiny-sdxl" && ! -d "$MODEL" ]]; then
    "$PYTHON" -m sdxl_trainer.models.tiny --output "$MODEL"
fi

"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_PROCESSES" sdxl_process_data_dir.py \
    --data_dir "$DATA_DIR" --cache_dir "$CACHE_DIR" --pretrained_model_name_or_path "$MODEL" \
    --min_resolution "$MIN_RESOLUTION" --max_resolution "$MAX_RESOLUTION" "$@"
