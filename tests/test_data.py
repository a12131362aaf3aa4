"""The data plan: split, epoch permutations, leftovers and deferred batches, rank slices, the dataset."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from train_helpers import write_synthetic_cache

from sdxl_trainer.data import dataset, sampler


def _buckets(sizes: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    out = [b for b, n in sizes.items() for _ in range(n)]
    random.Random(0).shuffle(out)  # entries of a bucket need not be contiguous
    return out


def _run_epochs(buckets, global_batch, acc, seed, epochs):
    state = sampler.SamplerState()
    plans = []
    for _ in range(epochs):
        plan = sampler.plan_epoch(buckets, state.carried_in, state.deferred_in, global_batch, acc, seed, state.epoch)
        plans.append(plan)
        state = sampler.SamplerState(state.epoch + 1, 0, plan.leftovers, plan.deferred)
    return plans


@pytest.mark.parametrize(
    ("sizes", "global_batch", "acc"),
    [
        ({(64, 64): 13, (64, 96): 7, (96, 64): 22}, 4, 1),
        ({(64, 64): 13, (64, 96): 7, (96, 64): 22}, 6, 3),
        ({(64, 64): 5, (128, 64): 9}, 5, 2),
        ({(64, 64): 40}, 8, 1),
    ],
)
def test_every_item_of_every_epoch_is_used_exactly_once_with_leftovers_carried(sizes, global_batch, acc):
    buckets = _buckets(sizes)
    epochs = 5
    plans = _run_epochs(buckets, global_batch, acc, seed=11, epochs=epochs)
    used: Counter = Counter()
    for e, plan in enumerate(plans, start=1):
        assert len(plan.batches) % acc == 0  # an epoch is a whole number of optimizer steps
        for batch in plan.batches:
            assert len(batch) == global_batch
            assert len({buckets[i] for i, _ in batch}) == 1  # one bucket per batch
            assert len({i for i, _ in batch}) == global_batch  # never an item twice in a batch
            used.update(batch)
            assert all(pe <= e for _, pe in batch)
    last = plans[-1]
    used.update(last.leftovers)
    used.update(s for b in last.deferred for s in b)
    # Each item of each epoch's permutation: exactly once, in a batch or still carried after the last epoch.
    assert used == Counter({(i, e): 1 for e in range(1, epochs + 1) for i in range(len(buckets))})
    counts = sampler.epoch_step_counts(list(Counter(buckets).values()), global_batch, acc, epochs)
    assert counts == [len(p.batches) // acc for p in plans]


def test_leftovers_and_deferred_batches_come_first_in_the_next_epoch():
    buckets = _buckets({(64, 64): 7, (64, 96): 9})
    first, second = _run_epochs(buckets, 4, 3, seed=1, epochs=2)
    assert first.leftovers  # 7 % 4 and 9 % 4
    assert [list(b) for b in first.deferred] == second.batches[: len(first.deferred)]
    carried = set(first.leftovers)
    in_second = [s for b in second.batches for s in b] + second.leftovers + [s for b in second.deferred for s in b]
    assert carried <= set(in_second)


def test_the_plan_depends_only_on_seed_and_epoch():
    buckets = _buckets({(64, 64): 13, (64, 96): 11})
    a = sampler.plan_epoch(buckets, [], [], 4, 1, seed=5, epoch=3)
    b = sampler.plan_epoch(list(buckets), [], [], 4, 1, seed=5, epoch=3)
    c = sampler.plan_epoch(buckets, [], [], 4, 1, seed=6, epoch=3)
    d = sampler.plan_epoch(buckets, [], [], 4, 1, seed=5, epoch=4)
    assert a.batches == b.batches and a.batches != c.batches and a.batches != d.batches


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_cover_each_global_batch_exactly_once(world):
    per_rank = 3
    buckets = _buckets({(64, 64): 30, (64, 96): 17})
    plan = sampler.plan_epoch(buckets, [], [], per_rank * world, 1, seed=2, epoch=1)
    for gb in plan.batches:
        slices = [sampler.rank_slice(gb, r, per_rank) for r in range(world)]
        assert all(len(s) == per_rank for s in slices)  # no rank waits for a batch another does not have
        assert sorted(s for sl in slices for s in sl) == sorted(gb)


def test_validation_split_is_deterministic_order_independent_and_never_empty_or_everything():
    uids = [f"ds/{i:04d}" for i in range(200)]
    a = sampler.split_validation(uids, 0.1, seed=3)
    b = sampler.split_validation(list(reversed(uids)), 0.1, seed=3)
    assert a == b and len(a) == 20
    assert sampler.split_validation(uids, 0.1, seed=4) != a
    assert len(sampler.split_validation(uids[:5], 0.01, seed=3)) == 1  # small data still validates (B18)
    assert len(sampler.split_validation(uids[:3], 1.0, seed=3)) == 2
    assert sampler.split_validation(uids[:1], 0.5, seed=3) == set()
    assert sampler.split_validation(uids, 0.0, seed=3) == set()
    # The smaller hold-out is a prefix of the larger one (validation images inside the validation-loss set).
    assert sampler.split_validation(uids, 0.05, seed=3) <= a


def test_small_buckets_are_reported_as_padded(tmp_path):
    root = write_synthetic_cache(tmp_path / "c" / "ds", {(64, 64): 5, (64, 96): 2})
    _, entries, _ = dataset.load_entries([root])
    notes = sampler.padded_bucket_notes(entries, 4)
    assert len(notes) == 1 and "64x96" in notes[0] and "padded" in notes[0]


def test_validation_batches_pad_with_zero_weights_and_cover_every_item_once():
    buckets = [(64, 64)] * 5 + [(64, 96)] * 2
    batches = sampler.validation_batches(buckets, 4)
    assert all(len(b) == 4 for b in batches)
    weighted = Counter(i for b in batches for i, w in b if w == 1.0)
    assert weighted == Counter(range(7))
    assert all(buckets[i] == buckets[b[0][0]] for b in batches for i, _ in b)


def test_sampler_state_round_trips_through_json(tmp_path):
    root = write_synthetic_cache(tmp_path / "c" / "ds", {(64, 64): 6})
    _, entries, _ = dataset.load_entries([root])
    state = sampler.SamplerState(3, 4, [(1, 2), (5, 2)], [[(0, 2), (3, 2)]])
    assert sampler.SamplerState.from_json(state.to_json(entries), entries) == state
    with pytest.raises(dataset.DataError, match="--resume_from_checkpoint"):
        sampler.SamplerState.from_json(state.to_json(entries), entries[:2])


def test_cache_roots_dataset_folders_and_list_files_resolve_to_dataset_caches(tmp_path):
    """The original found nothing when given the cache root (B15)."""
    a = write_synthetic_cache(tmp_path / "cache" / "a", {(64, 64): 2})
    b = write_synthetic_cache(tmp_path / "cache" / "b", {(64, 64): 2}, seed=1)
    assert dataset.resolve_cache_paths([str(tmp_path / "cache")], []) == [a.resolve(), b.resolve()]
    assert dataset.resolve_cache_paths([str(a)], []) == [a.resolve()]
    assert dataset.resolve_cache_paths([], [str(b / "cache.json")]) == [b.resolve()]
    with pytest.raises(dataset.DataError, match="--cached_dataset_lists"):
        dataset.resolve_cache_paths([], [str(tmp_path / "missing.list")])
    with pytest.raises(dataset.DataError, match="--cached_dataset_dirs.*no such"):
        dataset.resolve_cache_paths([str(tmp_path / "empty")], [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(dataset.DataError, match="--cached_dataset_dirs"):
        dataset.resolve_cache_paths([str(tmp_path / "empty")], [])


def test_two_datasets_with_the_same_relative_paths_stay_distinct(tmp_path):
    a = write_synthetic_cache(tmp_path / "cache" / "a", {(64, 64): 3})
    b = write_synthetic_cache(tmp_path / "cache" / "b", {(64, 64): 3}, seed=1)
    _, entries, _ = dataset.load_entries([a, b])
    assert len({e.uid for e in entries}) == 6
    assert [e.uid for e in entries] == sorted(e.uid for e in entries)


def _dataset(root: Path, dropout: float) -> dataset.CachedLatentDataset:
    caches, entries, _ = dataset.load_entries([root])
    return dataset.CachedLatentDataset(caches, entries, seed=9, num_train_timesteps=1000, dropout_fraction=dropout)


def test_dataset_randomness_is_keyed_by_item_and_epoch(tmp_path):
    root = write_synthetic_cache(tmp_path / "c" / "ds", {(64, 96): 4})
    one, two = _dataset(root, 0.5), _dataset(root, 0.5)  # e.g. two ranks, or a run and its resume
    a, b = one[(2, 1, 1.0)], two[(2, 1, 1.0)]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = one[(2, 2, 1.0)]
    assert not torch.equal(a["noise"], c["noise"])  # a new epoch draws new noise and a new posterior sample
    assert a["latents"].shape == (4, 12, 8) and a["latents"].dtype == torch.float32
    assert a["prompt_embeds"].dtype == torch.float32  # one dtype in the batch (B36)


def test_caption_dropout_uses_the_empty_embeddings_at_the_asked_rate_and_never_in_validation(tmp_path):
    root = write_synthetic_cache(tmp_path / "c" / "ds", {(64, 64): 50})
    ds = _dataset(root, 0.3)
    empty = ds.empty[0]
    samples = [ds[(i, e, 1.0)] for i in range(50) for e in (1, 2, 3, 4)]
    dropped = [s for s in samples if s["dropped"]]
    assert 0.2 < len(dropped) / len(samples) < 0.4
    assert all(torch.equal(s["prompt_embeds"], empty["prompt_embeds"].float()) for s in dropped)
    assert not any(ds[(i, sampler.VALIDATION_EPOCH, 1.0)]["dropped"] for i in range(50))


def test_collate_builds_per_sample_time_ids(tmp_path):
    root = write_synthetic_cache(tmp_path / "c" / "ds", {(64, 96): 3})
    ds = _dataset(root, 0.0)
    batch = dataset.collate([ds[(i, 1, 1.0)] for i in range(3)])
    expected = [list(ds.entries[i].item.time_ids) for i in range(3)]
    assert batch["time_ids"].tolist() == expected and batch["time_ids"].dtype == torch.int64
    assert len({tuple(r) for r in expected}) == 3


def test_dataloader_workers_read_the_cache_on_cpu(tmp_path):
    root = write_synthetic_cache(tmp_path / "c" / "ds", {(64, 64): 4})
    ds = _dataset(root, 0.0)
    keys = [[(0, 1, 1.0), (1, 1, 1.0)], [(2, 1, 1.0), (3, 1, 1.0)]]
    with_workers = list(dataset.make_loader(ds, keys, num_workers=1, pin=False))
    inline = list(dataset.make_loader(ds, keys, num_workers=0, pin=False))
    assert all(torch.equal(a["noise"], b["noise"]) for a, b in zip(with_workers, inline, strict=True))
