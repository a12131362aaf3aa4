#!/usr/bin/env bash
# Every run of the several-GPU issue, on one machine with NGPUS GPUs (default: all). One JSON line per
# measurement goes to $RESULTS (default bench/results/multi_gpu.jsonl). Leave NVLink multicast off.
#   bash bench/multi_gpu.sh            # scaling (1,2,4,8 GPUs x 3 strategies), 2 x 24 GiB batch search,
#                                      # exact resume over NCCL, N-process caching vs 1 process
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python3}"
NGPUS="${NGPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
RESULTS="${RESULTS:-bench/results/multi_gpu.jsonl}"
mkdir -p "$(dirname "$RESULTS")"

# 1. Training scaling at 1024 px, full-size random-weight UNet: images/s per strategy and GPU count.
for n in 1 2 4 8; do
  [ "$n" -le "$NGPUS" ] || continue
  for strategy in full_shard shard_grad_op no_shard; do
    "$PYTHON" bench/bench_train.py --nproc "$n" --sharding "$strategy" --only adamw8bit_ckpt_B32,adamw_nockpt_B12 \
      | grep '^{' | tee -a "$RESULTS"
  done
done

# 2. The 2 x 24 GB promise: largest per-GPU batch at 1024 under a 24 GiB cap per GPU (FULL_SHARD, AdamW8bit,
#    checkpointing).
if [ "$NGPUS" -ge 2 ]; then
  "$PYTHON" bench/bench_train.py --nproc 2 --memory_search --memory_cap_gib 24 | grep '^{' | tee -a "$RESULTS"
fi

# 3. Exact resume across a real NCCL run (tiny model): N steps vs N/2 + resume.
"$PYTHON" bench/multi_gpu_resume.py --nproc "$NGPUS" | grep '^{' | tee -a "$RESULTS"

# 4. Caching with N processes against 1 process (images/s and equality of the union).
"$PYTHON" bench/multi_gpu_caching.py --nproc "$NGPUS" | grep "^{" | tee -a "$RESULTS"
