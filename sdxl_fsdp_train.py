"""Full fine-tuning of the SDXL UNet with FSDP2 (FULL_SHARD by default) from a latent/embedding cache.

One GPU, several GPUs or several machines; CPU processes over gloo when there is no GPU:

    accelerate launch --config_file configs/accelerate/2gpu.yaml sdxl_fsdp_train.py \\
        --pretrained_model_name_or_path models/sdxl-base --cached_dataset_dirs cache/ --output_dir runs/my-run
    torchrun --nproc_per_node 8 sdxl_fsdp_train.py ...
    python sdxl_fsdp_train.py ...          (one process, no launcher)

Resume after a stop or a crash with --resume_from_checkpoint auto. See docs/training.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when the run completed (or was stopped by a signal, checkpoint written); an expected error is
    one line on stderr and status 1 (sdxl_trainer.cli)."""
    from sdxl_trainer import cli

    def run() -> int:
        from sdxl_trainer.training import loop, train_args

        args = cli.parse_on_rank0(lambda: train_args.parse_args(argv, description=__doc__))
        try:
            summary = loop.main(args)
        except loop.REFUSALS as exc:  # the run folder or checkpoint does not allow this run: one clear message
            if cli.rank() == 0:
                print(f"sdxl_fsdp_train.py: error: {exc}", file=sys.stderr)
            return 2
        return 0 if summary.get("completed") or summary.get("stopped_by_signal") else 1

    return cli.run_main(run, cli.trainer_errors)


if __name__ == "__main__":
    sys.exit(main())
