"""Evaluation during training: the validation loss on the hold-out, and the hooks into samples, validation
images and scores (`sdxl_trainer.evaluation.evaluator`), at epoch 0 (the base model) and every N epochs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from sdxl_trainer.data import dataset, sampler
from sdxl_trainer.distributed import DistInfo, barrier
from sdxl_trainer.evaluation import evaluator
from sdxl_trainer.training import ema, loss, objective, saving
from sdxl_trainer.training.run_log import TAG_VALIDATION_LOSS, logger

if TYPE_CHECKING:
    from sdxl_trainer.training.state import Trainer


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # --compile's blocks run eager: no-grad eval graphs would compile anew
def validation_loss(tr: Trainer) -> float | None:
    """Mean loss over the hold-out with fixed noise and timesteps: each item's randomness is seeded by the
    item alone (independent of the training stream and of the epoch), so epochs compare. Collective.

    Every item counts once: padding (weight 0) only evens out the ranks' forward passes. None when there is
    nothing held out (never a division by zero, B18)."""
    if not tr.data.validation:
        return None
    gb, per_rank = tr.data.global_batch, tr.args.train_batch_size
    keys = tr.data.validation_keys
    mine = [
        [(i, sampler.VALIDATION_EPOCH, w) for i, w in sampler.rank_slice(keys[k : k + gb], tr.info.rank, per_rank)]
        for k in range(0, len(keys), gb)
    ]
    loader = dataset.make_loader(tr.data.dataset, mine, tr.args.dataloader_num_workers, tr.info.device.type == "cuda")
    totals = torch.zeros(2, device=tr.info.device, dtype=torch.float64)
    tr.unet.eval()
    for batch in loader:
        batch = {k: v.to(tr.info.device, non_blocking=True) for k, v in batch.items()}
        prediction, target = objective.predict(tr.unet, tr.noise_scheduler, batch)
        weights = batch["sample_weights"].double()
        # Plain MSE (the loss options left out, so epochs compare), weighted by the loss mask with --masked_loss.
        mask = batch.get("loss_mask")
        per_sample = loss.per_sample_loss(prediction, target, batch["timesteps"], tr.noise_scheduler,
                                          element_weights=mask).double()  # fmt: skip
        totals += torch.stack([(per_sample * weights).sum(), weights.sum()])
    tr.unet.train()
    dist.all_reduce(totals)
    total, count = totals.tolist()
    return total / count if count > 0 else None


def build_evaluator(
    args: argparse.Namespace, run_dir: Path, info: DistInfo, training, validation, tb_writer
) -> evaluator.Evaluator | None:
    """The metrics developer's Evaluator, when samples or validation images are asked for."""
    if not (args.save_samples or args.validation_image):
        return None
    captions = sorted({e.item.caption for e in training if e.item.caption})
    image_items: list = []
    if args.validation_image and validation:
        # The same ranking as the hold-out: validation images are the first items of it.
        count = max(1, round(args.validation_image_percent * (len(training) + len(validation))))
        ranked = sorted(validation, key=lambda e: (sampler.mix_seed(args.set_seed, "validation-split", e.uid), e.uid))
        image_items = [e.item for e in ranked[:count]]
    return evaluator.Evaluator(
        args,
        run_dir,
        args.pretrained_model_name_or_path,
        captions,
        image_items,
        Path(args.data_dir) if getattr(args, "data_dir", None) else None,
        info.rank,
        info.world_size,
        info.device,
        tb_writer=tb_writer,
        weight_dtype=saving.DTYPES[args.weight_dtype],
        vae_override=getattr(args, "vae", None),  # the cache's VAE (training.cache_checks)
        log=logger.info,
    )


def evaluate(tr: Trainer, epoch: int, final: bool = False) -> None:
    """Validation loss, then samples/validation images from the trained UNet handed over by rank 0. `final`: the
    last step of a run that ends mid-epoch, evaluated with whatever is enabled whatever the epoch."""
    a = tr.args
    if a.validation_loss and (final or epoch % a.validation_loss_every_n_epochs == 0):
        value = validation_loss(tr)
        if value is None:
            logger.warning("validation loss: no held-out items (raise --validation_loss_percent)")
        else:
            tr.log.scalar(TAG_VALIDATION_LOSS, value, epoch)
            tr.log.record(
                {"event": "validation", "epoch": epoch, "step": tr.progress.step, "validation_loss": value,
                 "final": final}
            )  # fmt: skip
            best = tr.progress.best_validation_loss
            tr.progress.best_validation_loss = value if best is None else min(best, value)
            logger.info("epoch %d: validation loss %.6f", epoch, value)
    if tr.evaluator is not None and tr.evaluator.wants_to_run(epoch, final):
        # Collective; full on rank 0 only. The EMA weights with --use_ema (unless --no-ema_for_eval).
        full = ema.full_state_dict(tr.optimizer, tr.unet, tr.ema, tr.ema is not None and a.ema_for_eval)
        path = saving.write_handoff(full, tr.handoff_dir) if tr.info.is_main_process else None
        del full
        barrier()
        try:
            scores = tr.evaluator.run(epoch, tr.handoff_dir / saving.HANDOFF_FILE, final)
        finally:
            barrier()
            if path is not None:
                saving.remove_handoff(tr.handoff_dir)
        if scores:  # nothing scored (e.g. samples only): no empty score line in metrics.jsonl
            tr.log.record({"event": "scores", "epoch": epoch, "step": tr.progress.step, "final": final, **scores})
    if not final:
        tr.progress.evaluated_epoch = epoch
    tr.progress.evaluated_step = tr.progress.step
