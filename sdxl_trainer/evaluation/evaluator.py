"""The trainer's evaluation step: sample-grid rows, validation images and their scores, for the trained UNet.

The trainer calls `Evaluator.run(epoch, handoff_file)` on every rank at the top of an epoch iteration
(epoch 0 = the base model). The SDXL pipeline is built once per process and kept on the CPU between
evaluations; each run copies the trained UNet weights from the handoff file (a safetensors file of the
full fp32 state dict written by rank 0) into it, so the images come from the trained model (the seed
scored the base model, B2). Prompts and validation items are split across ranks without duplicates; each
rank scores its own images and only small per-image features are gathered. Scores go to TensorBoard
under the original's tags and to `<run>/validation_scores.jsonl`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from sdxl_trainer.evaluation import sampling, score_math
from sdxl_trainer.evaluation.eval_args import EvaluationArgsError, add_args, check_args
from sdxl_trainer.evaluation.scorers import pil_to_uint8_chw
from sdxl_trainer.evaluation.support import (
    METRIC_TAGS,
    ScorerPlan,
    Scorers,
    aggregate_scores,
    build_scorers,
    load_reference_image,
    load_unet_weights,
    plan_scorers,
    read_reference_cache,
    reference_cache_path,
    reference_set_key,
    write_reference_cache,
)

__all__ = ["Evaluator", "EvaluationArgsError", "add_args", "check_args", "validation_seed"]


class Evaluator:
    """Samples, validation images and scores of the trained UNet; one per process, built at start."""

    def __init__(
        self,
        args: argparse.Namespace,
        run_dir: Path,
        pretrained: str,
        sample_captions: list[str],
        validation_items: list,
        data_root: Path | None,
        rank: int,
        world_size: int,
        device: torch.device,
        tb_writer=None,
        weight_dtype: torch.dtype = torch.float16,
        *,
        vae_override: str | None = None,
        inception_extractor: torch.nn.Module | None = None,
        log=print,
    ):
        try:
            check_args(args)
        except sampling.SamplePromptsError as exc:
            raise EvaluationArgsError(str(exc)) from exc
        self.args = args
        self.run_dir = Path(run_dir)
        self.pretrained = pretrained
        self.vae_override = vae_override
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.tb_writer = tb_writer if rank == 0 else None
        # fp16 on a CPU is slow and partly unsupported: CPU runs (tests, CI) sample in fp32.
        cpu_half = self.device.type == "cpu" and weight_dtype == torch.float16
        self.dtype = torch.float32 if cpu_half else weight_dtype
        self._log = log
        self._pipe = None
        self._grid: sampling.SampleGrid | None = None
        self._scorers: Scorers | None = None
        # Inception features of the validation set's reference images, computed once (or read from the
        # cache file keyed by the set's content); only rank 0 holds them, the others only know they exist.
        self._reference_ready = False
        self._reference_pool: np.ndarray | None = None
        self._notes_shown: set[str] = set()

        self.sample_prompts: list[str] = []
        if args.save_samples:
            file_prompts = sampling.read_prompts_file(args.sample_prompts)
            self.sample_prompts = sampling.choose_sample_prompts(file_prompts, sample_captions, args.num_sample_images)
            if not self.sample_prompts:
                raise EvaluationArgsError(
                    f"--save_samples: {args.sample_prompts} has no prompts and there are no captions"
                )
            self.sample_seeds = sampling.prompt_seeds(args.sample_seed, len(self.sample_prompts))
        # Sorted by key: every rank holds the same list in the same order, whatever order it came in.
        self.validation_items = sorted(validation_items, key=lambda it: it.key) if args.validation_image else []
        if args.validation_image and not self.validation_items:
            self._note("--validation_image: there are no validation items, so no validation images or scores")
        self.data_root = Path(data_root) if data_root is not None else None
        reference_reason = None
        if self.data_root is None or not self.data_root.is_dir():
            reference_reason = (
                f"the data folder {self.data_root} is not available to read reference images (IS and HPS still run)"
                if self.data_root is not None
                else "no data folder was given to read reference images (IS and HPS still run)"
            )
        try:
            self.plan: ScorerPlan = plan_scorers(
                args.metrics if args.validation_image else [],
                inception_weights=args.metrics_inception_weights,
                lpips_backbone=args.metrics_lpips_backbone,
                hps_checkpoint=args.metrics_hps_checkpoint,
                reference_missing_reason=reference_reason,
                have_custom_inception=inception_extractor is not None,
            )
            # Built now (on the CPU) so a wrong weights file stops the run at start; moved to the device
            # only while scoring.
            if self.validation_items and self.plan.enabled:
                self._scorers = build_scorers(
                    self.plan,
                    device="cpu",
                    batch_size=args.metrics_batch_size,
                    hps_model=args.metrics_hps_model,
                    inception_extractor=inception_extractor,
                    half_hps=self.device.type == "cuda",
                )
        except score_math.ScoreError as exc:  # a weights file the user gave is missing or of the wrong kind
            raise EvaluationArgsError(str(exc)) from exc
        if self.validation_items:
            for line in self.plan.skipped.values():
                self._note(line)

    # ------------------------------------------------------------------ when
    def wants_samples(self, epoch: int, final: bool = False) -> bool:
        """`final`: the evaluation of the last step of a run that ends mid-epoch: whatever is enabled runs."""
        a = self.args
        due = epoch % a.save_samples_every_n_epochs == 0 and (epoch == 0 or epoch >= a.start_save_samples_epoch)
        return bool(a.save_samples) and (final or due)

    def wants_validation(self, epoch: int, final: bool = False) -> bool:
        return bool(self.validation_items) and (final or epoch % self.args.validation_image_every_n_epochs == 0)

    def wants_to_run(self, epoch: int, final: bool = False) -> bool:
        return self.wants_samples(epoch, final) or self.wants_validation(epoch, final)

    # ------------------------------------------------------------------ entry point
    def run(self, epoch: int, unet_state_dict_path: Path | None, final: bool = False) -> dict[str, float]:
        """Collective: every rank calls it. Returns the scores (the same dict on every rank)."""
        if not self.wants_to_run(epoch, final):
            return {}
        start = time.monotonic()
        pipe = self._pipeline()
        if unet_state_dict_path is not None:
            load_unet_weights(pipe.unet, Path(unet_state_dict_path))
        pipe.to(self.device)
        result: dict[str, float] = {}
        try:
            if self.wants_samples(epoch, final):
                self._run_samples(epoch, pipe)
            if self.wants_validation(epoch, final):
                result = self._run_validation(epoch, pipe)
        finally:
            # Give the GPU back to training: the pipeline and scorers wait on the CPU.
            self._offload(pipe)
            if self._scorers is not None and self._offloading:
                self._scorers.to("cpu")
                torch.cuda.empty_cache()
        if self.rank == 0:
            self._log(f"evaluation at epoch {epoch} took {time.monotonic() - start:.1f} s")
        return result

    # ------------------------------------------------------------------ helpers
    @property
    def _offloading(self) -> bool:
        return not self.args.keep_eval_models_on_device and self.device.type != "cpu"

    def _offload(self, pipe) -> None:
        if self._offloading and pipe.device.type != "cpu":
            pipe.to("cpu")
            torch.cuda.empty_cache()

    def _note(self, line: str) -> None:
        """Print a line once per process on rank 0."""
        if self.rank == 0 and line not in self._notes_shown:
            self._notes_shown.add(line)
            self._log(line)

    def _all_gather(self, obj):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _pipeline(self):
        if self._pipe is None:
            from sdxl_trainer.models import loading
            from sdxl_trainer.training import prediction

            pipe = loading.load_pipeline(self.pretrained, vae_override=self.vae_override, torch_dtype=self.dtype)
            # Sample as the model is trained: its target, and trailing spacing with zero terminal SNR.
            a = self.args
            pipe.scheduler = prediction.inference_scheduler(
                pipe.scheduler, getattr(a, "prediction_type", None), getattr(a, "zero_terminal_snr", False)
            )
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        return self._pipe

    def _sample_size(self, pipe) -> tuple[int, int]:
        default_px = pipe.default_sample_size * pipe.vae_scale_factor
        return self.args.sample_width_px or default_px, self.args.sample_height_px or default_px

    def _generate(self, pipe, prompts, seeds, size_wh) -> list[Image.Image]:
        a = self.args
        w, h = size_wh
        from sdxl_trainer.training import prediction

        rescale = prediction.guidance_rescale(
            getattr(a, "zero_terminal_snr", False), getattr(a, "sample_guidance_rescale", None)
        )
        return sampling.generate_images(
            pipe, prompts, seeds, w, h, a.sample_steps, a.sample_guidance_scale, a.sample_batch_size, rescale
        )

    # ------------------------------------------------------------------ samples
    def _run_samples(self, epoch: int, pipe) -> None:
        size_wh = self._sample_size(pipe)
        mine = list(range(self.rank, len(self.sample_prompts), self.world_size))
        images = self._generate(
            pipe, [self.sample_prompts[i] for i in mine], [self.sample_seeds[i] for i in mine], size_wh
        )
        gathered = self._all_gather([(i, np.asarray(im)) for i, im in zip(mine, images, strict=True)])
        if self.rank != 0:
            return
        by_index = dict(pair for part in gathered for pair in part)
        row = [Image.fromarray(by_index[i]) for i in range(len(self.sample_prompts))]
        if self._grid is None:
            settings = {
                "prompts": self.sample_prompts,
                "seeds": self.sample_seeds,
                "width_px": size_wh[0],
                "height_px": size_wh[1],
                "steps": self.args.sample_steps,
                "guidance_scale": self.args.sample_guidance_scale,
            }
            self._grid = sampling.SampleGrid(self.run_dir / "samples", settings, self.args.sample_grid_max_rows)
            if self._grid.moved_aside is not None:
                self._log(f"samples: settings changed since the last run; old rows moved to {self._grid.moved_aside}")
        files = self._grid.add_row(epoch, row)
        self._log(f"samples: row '{sampling.row_label(epoch)}' written to {', '.join(str(f) for f in files)}")
        if self.tb_writer is not None:
            image = self._grid.render([epoch])
            scale = min(1.0, 4096 / image.width)  # keep event files small; the PNG on disk is full size
            if scale < 1.0:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
            self.tb_writer.add_image("Samples/grid row", np.asarray(image), epoch, dataformats="HWC")

    # ------------------------------------------------------------------ validation
    def _scorers_on_device(self) -> Scorers:
        scorers = self._scorers or Scorers()  # empty when no score can run
        return scorers.to(self.device)

    def _run_validation(self, epoch: int, pipe) -> dict[str, float]:
        start = time.monotonic()
        items = self.validation_items
        mine = list(range(self.rank, len(items), self.world_size))
        # Batches need one size: generate grouped by bucket, remember each image's item index.
        mine.sort(key=lambda i: (items[i].bucket_wh, i))
        images: dict[int, Image.Image] = {}
        for bucket in dict.fromkeys(items[i].bucket_wh for i in mine):
            group = [i for i in mine if items[i].bucket_wh == bucket]
            seeds = [validation_seed(self.args.sample_seed, items[i].key) for i in group]
            made = self._generate(pipe, [items[i].caption for i in group], seeds, tuple(bucket))
            images.update(zip(group, made, strict=True))
        mine.sort()
        self._offload(pipe)  # the scorers get the GPU memory the pipeline used (HPS's ViT-H is ~2 GB)
        if self.args.save_validation_images:
            self._save_validation_images(epoch, {i: images[i] for i in mine})

        scorers = self._scorers_on_device()  # built once per process, on the device only while scoring
        need_reference_pool = self.plan.wants_reference_features and not self._reference_ready
        if need_reference_pool:
            key = reference_set_key(items, scorers.inception.identity)
            cache_file = reference_cache_path(self.run_dir, key)
            cached = read_reference_cache(cache_file, key) if self.rank == 0 else None
            if self._broadcast(cached is not None):
                if self.rank == 0:
                    self._reference_pool = cached[0]
                    self._note(f"validation: reference features read from {cache_file}")
                self._reference_ready, need_reference_pool = True, False
        wants_refs = need_reference_pool or "lpips" in self.plan.enabled
        references: dict[int, torch.Tensor | None] = {}
        problems: list[str] = []
        if wants_refs:
            for i in mine:
                ref, problem = load_reference_image(self.data_root, items[i])
                references[i] = None if ref is None else pil_to_uint8_chw(ref)
                if problem:
                    problems.append(problem)

        gen_tensors = [pil_to_uint8_chw(images[i]) for i in mine]
        record: dict[int, dict] = {i: {} for i in mine}
        if scorers.inception is not None:
            pool, logits = scorers.inception.features(gen_tensors)
            for j, i in enumerate(mine):
                record[i]["pool"], record[i]["logits"] = pool[j], logits[j]
            if need_reference_pool:
                with_ref = [i for i in mine if references[i] is not None]
                ref_pool, _ = scorers.inception.features([references[i] for i in with_ref])
                for j, i in enumerate(with_ref):
                    record[i]["ref_pool"] = ref_pool[j]
        if scorers.lpips is not None:
            paired = [j for j, i in enumerate(mine) if references[i] is not None]
            values = scorers.lpips.distances([gen_tensors[j] for j in paired], [references[mine[j]] for j in paired])
            for j, v in zip(paired, values, strict=True):
                record[mine[j]]["lpips"] = v
        if scorers.hps is not None:
            values = scorers.hps.scores([images[i] for i in mine], [items[i].caption for i in mine])
            for i, v in zip(mine, values, strict=True):
                record[i]["hps"] = v

        gathered = self._all_gather((record, problems))
        result = None
        if self.rank == 0:
            merged: dict[int, dict] = {}
            all_problems: list[str] = []
            for part, part_problems in gathered:
                merged.update(part)
                all_problems += part_problems
            if all_problems:
                self._note(
                    f"validation: {len(all_problems)} of {len(items)} reference images could not be read and are "
                    f"left out of LPIPS/FID/KID (first: {all_problems[0]})"
                )
            if need_reference_pool:
                ok = [("ref_pool" in merged[i]) for i in range(len(items))]
                rows = [merged[i]["ref_pool"] for i in range(len(items)) if ok[i]]
                pool = np.stack(rows) if rows else np.zeros((0, score_math.INCEPTION_POOL_DIM), np.float32)
                self._reference_pool = pool
                write_reference_cache(cache_file, key, pool, ok)
            result = self._compute_scores([merged[i] for i in range(len(items))])
            self._report(epoch, result, len(items), time.monotonic() - start)
        self._reference_ready = self._reference_ready or need_reference_pool
        return self._broadcast(result)

    def _compute_scores(self, records: list[dict]) -> dict[str, float]:
        return aggregate_scores(records, self._reference_pool, self.plan.enabled, self.args, self._note)

    def _report(self, epoch: int, result: dict[str, float], n_images: int, seconds: float) -> None:
        shown = " ".join(f"{score_math.DISPLAY_NAMES.get(k, k)} {v:.4g}" for k, v in result.items()) or "no scores"
        self._log(f"validation at epoch {epoch}: {n_images} images in {seconds:.1f} s: {shown}")
        if self.tb_writer is not None:
            for name, value in result.items():
                self.tb_writer.add_scalar(METRIC_TAGS[name], value, epoch)
        line = json.dumps({"epoch": epoch, "images": n_images, **result})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "validation_scores.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def _save_validation_images(self, epoch: int, images: dict[int, Image.Image]) -> None:
        """PNG + caption per image, named after the item's path in the data folder, so that
        `metrics.py --generated <this folder> --reference <data folder>` pairs them by name."""
        folder = self.run_dir / "validation_images" / f"epoch_{epoch:05d}"
        for i, image in images.items():
            item = self.validation_items[i]
            path = (folder / item.image_relpath).with_suffix(".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
            path.with_suffix(".txt").write_text(item.caption, encoding="utf-8")


def validation_seed(base_seed: int, item_key: str) -> int:
    """A fixed seed per validation item, from its stable key: the same on every rank, epoch and run."""
    return (base_seed + int(hashlib.sha256(item_key.encode()).hexdigest()[:12], 16)) % (2**63)
