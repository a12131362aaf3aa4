"""The training data over the cache: the item list from every dataset cache, and a Dataset whose randomness is
keyed by item so that any number of ranks and any resume see the same (the epoch plans: `data.sampler`).

Randomness (posterior sample, diffusion noise, timestep, caption dropout) comes from a generator seeded by
(seed, item, epoch of its permutation): the same numbers whatever the rank layout, the DataLoader workers
or a resume, so 2 processes reproduce 1 process with the same global batch and a resumed run reproduces an
uninterrupted one.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sdxl_trainer.data import cache_format, cache_reader
from sdxl_trainer.data.sampler import VALIDATION_EPOCH, DataError, Entry, mix_seed
from sdxl_trainer.training import noise as noise_options
from sdxl_trainer.training import objective, timesteps

logger = logging.getLogger("sdxl_trainer")


def resolve_cache_paths(dirs: Sequence[str], lists: Sequence[str]) -> list[Path]:
    """`--cached_dataset_dirs` are cache roots or dataset cache folders (B15); `--cached_dataset_lists` (the
    original's .list files) are mapped to the dataset cache folder that holds them."""
    paths: list[str | Path] = list(dirs)
    for item in lists:
        p = Path(item)
        if not p.exists():
            raise DataError(f"--cached_dataset_lists: {item} does not exist")
        paths.append(p if p.is_dir() else p.parent)
    try:
        return cache_reader.find_dataset_caches(paths)
    except cache_format.CacheError as exc:
        raise DataError(f"--cached_dataset_dirs: {exc}") from exc


def check_cache_settings(caches: Sequence[cache_reader.DatasetCache], expected: dict[str, int | None]) -> None:
    """Flags such as --max_resolution, when given, must match what the cache was built with (the original's
    "caching and training resolution must match" warning, made a check)."""
    for c in caches:
        image = c.fingerprint.get("image", {})
        cached = {
            "max_resolution": image.get("max_resolution"),
            "min_resolution": image.get("min_resolution"),
            "upscale_to_resolution": (image.get("upscale") or {}).get("to_resolution"),
        }
        for name, value in expected.items():
            if value is not None and cached.get(name) != value:
                raise DataError(
                    f"--{name} {value}: the cache {c.root} was built with {cached.get(name)}; re-run "
                    "sdxl_process_data_dir.py with the same value, or leave the flag out"
                )


def verify_items(cache: cache_reader.DatasetCache) -> tuple[list[cache_format.CacheItem], list[str]]:
    """Read every item file now (checksum and values, as training would); return the good items and one line per
    bad one, so a damaged item is left out of the plan instead of being skipped every epoch."""
    good, bad = [], []
    for item in cache.items:
        try:
            cache.load_item_tensors(item)
            good.append(item)
        except cache_format.BadItemError as exc:  # reported and left out, never a crash of the run
            bad.append(str(exc))
    return good, bad


def load_entries(
    cache_paths: Sequence[Path], verify: bool = False
) -> tuple[list[cache_reader.DatasetCache], list[Entry], list[str]]:
    """Open every dataset cache; entries sorted by (dataset, key): the same order on every rank."""
    caches = [cache_reader.open_dataset_cache(p) for p in cache_paths]
    entries: list[Entry] = []
    problems: list[str] = []
    seen_names: dict[str, int] = {}
    for ci, c in enumerate(caches):
        name = c.name if c.name not in seen_names else f"{c.name}#{ci}"
        seen_names[name] = ci
        items = c.items
        if verify:
            items, bad = verify_items(c)
            problems += bad
        entries += [Entry(f"{name}/{it.key}", ci, it) for it in items]
    if not entries:
        raise DataError(f"--cached_dataset_dirs: the caches {[str(p) for p in cache_paths]} hold no items")
    return caches, entries, problems


class CachedLatentDataset(Dataset):
    """Reads one item from the cache on CPU (safe in DataLoader workers) and draws its randomness.

    Indexed by (entry index, permutation epoch, weight); returns fp32 tensors, int64 time ids and the loss weight
    `sample_weights` (0.0 for padding). An item whose file fails its checks (`cache_reader`) is never a crash: it
    comes back as a placeholder of the right shape with weight 0 and `bad` set, and is named in the log once.
    """

    def __init__(
        self,
        caches: Sequence[cache_reader.DatasetCache],
        entries: Sequence[Entry],
        seed: int,
        num_train_timesteps: int,
        dropout_fraction: float,
        timestep_options: timesteps.TimestepOptions | None = None,
        noise: noise_options.NoiseOptions | None = None,
        masked_loss: bool = False,
    ):
        self.caches = list(caches)
        self.masked_loss = masked_loss
        self.entries = list(entries)
        self.seed = seed
        self.num_train_timesteps = num_train_timesteps
        self.dropout_fraction = dropout_fraction
        self.empty = [c.load_empty_embeddings() for c in self.caches]
        self.timesteps = timesteps.TimestepSampler(timestep_options or timesteps.TimestepOptions(), num_train_timesteps)
        self.noise_options = noise or noise_options.NoiseOptions()
        self.reported: set[int] = set()  # bad items already named by this process

    def _load(self, entry: Entry, index: int) -> tuple[dict[str, torch.Tensor], bool]:
        """The item's tensors, or a zero placeholder (and True) when its file is damaged or unusable."""
        try:
            return self.caches[entry.cache_index].load_item_tensors(entry.item), False
        except cache_format.BadItemError as exc:
            if index not in self.reported:
                self.reported.add(index)
                logger.warning(f"cache item skipped (not trained, counted): {exc}; repair it with "
                               "sdxl_process_data_dir.py --verify_hashes")  # fmt: skip
            w, h = entry.item.bucket_wh
            empty = self.empty[entry.cache_index]
            latent = torch.zeros(4, h // 8, w // 8)
            return {"latent_mean": latent, "latent_std": latent, **empty}, True

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int, float]) -> dict[str, torch.Tensor]:
        index, perm_epoch, weight = key
        entry = self.entries[index]
        tensors, bad = self._load(entry, index)
        g = torch.Generator().manual_seed(mix_seed(self.seed, "sample", entry.uid, perm_epoch))
        # Fixed draw order: dropout, posterior sample, noise, timestep, then the noise options' draws (none when
        # they are off, so that turning no option on leaves the stream as it was).
        drop = torch.rand((), generator=g).item() < self.dropout_fraction and perm_epoch != VALIDATION_EPOCH
        text = self.empty[entry.cache_index] if drop else tensors
        latents = objective.sample_latents(tensors["latent_mean"], tensors["latent_std"], g)
        noise = objective.sample_noise(latents.shape, g)
        timestep = self.timesteps.sample(g)
        it = entry.item
        extra = {}
        if self.masked_loss:  # per-element loss weights; an item without a mask weighs every element 1
            mask = tensors.get("loss_mask")
            extra["loss_mask"] = torch.ones((1, *latents.shape[1:])) if mask is None else mask.float()
        return {
            **extra,
            "latents": latents,
            **noise_options.shape_noise(noise, self.noise_options, g),
            "timesteps": timestep,
            "prompt_embeds": text["prompt_embeds"].float(),
            "pooled_prompt_embeds": text["pooled_prompt_embeds"].float(),
            "original_size_hw": torch.tensor(it.original_size_hw, dtype=torch.int64),
            "crop_top_left": torch.tensor(it.crop_top_left, dtype=torch.int64),
            "target_size_hw": torch.tensor(it.target_size_hw, dtype=torch.int64),
            "sample_weights": torch.tensor(0.0 if bad else float(weight)),
            "index": torch.tensor(index, dtype=torch.int64),
            "dropped": torch.tensor(drop),
            "bad": torch.tensor(bad),
        }


def pad_prompt_embeds(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack (L_i, D) text embeddings of captions of different lengths (1-3 CLIP chunks): zeros up to the
    longest, and a (B, L) bool `encoder_attention_mask` (True = a real token) that keeps the padding out of
    cross-attention, so a caption trains the same whatever its batch partners. None when all lengths agree
    (no mask: the plain attention kernels)."""
    longest = max(e.shape[0] for e in embeds)
    if all(e.shape[0] == longest for e in embeds):
        return torch.stack(list(embeds)), None
    padded = torch.zeros((len(embeds), longest, embeds[0].shape[1]), dtype=embeds[0].dtype)
    mask = torch.zeros((len(embeds), longest), dtype=torch.bool)
    for i, e in enumerate(embeds):
        padded[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return padded, mask


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per key (text embeddings padded to the batch's longest caption), and build SDXL time ids per
    sample: a (B, 6) tensor, rows in SDXL's order (B1)."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "prompt_embeds"}
    batch["prompt_embeds"], attention_mask = pad_prompt_embeds([s["prompt_embeds"] for s in samples])
    if attention_mask is not None:
        batch["encoder_attention_mask"] = attention_mask
    batch["time_ids"] = objective.compute_time_ids(
        batch.pop("original_size_hw"), batch.pop("crop_top_left"), batch.pop("target_size_hw")
    )
    return batch


def _ignore_signals_in_worker(_worker_id: int) -> None:
    # Workers share their rank's process group: a SIGTERM sent to the whole job must not kill them before the
    # rank has written its checkpoint; the loader shuts them down afterwards.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    dataset: CachedLatentDataset, batches: Sequence[Sequence[tuple[int, int, float]]], num_workers: int, pin: bool
) -> torch.utils.data.DataLoader:
    """A DataLoader over a precomputed list of this rank's batches (the sampler is the plan)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[list(b) for b in batches],
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_ignore_signals_in_worker if num_workers > 0 else None,
    )
