"""Which item trains when: the validation hold-out, each epoch's bucket-pure global batches, the carried
remainders, and the sampler state a checkpoint stores. Pure functions.

Every rank builds the same plan from the same sorted items and the same seed, so ranks never disagree about
the data (B5) and never wait for a batch another rank does not have: a plan is a list of GLOBAL batches of
`train_batch_size * world_size` items from one bucket, and rank r takes slice r of each. A bucket's
remainder smaller than a global batch is carried into the next epoch exactly once (B6, B7). Every item is
trained every epoch: a bucket smaller than a global batch forms one batch padded with repeats of its items
whose loss weight is 0, and the last epoch of a run trains the remainders in padded batches too."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sdxl_trainer.data import cache_format

VALIDATION_EPOCH = -1  # the "permutation epoch" of validation samples: fixed noise for every evaluation
PADDING_EPOCH = -2  # the "permutation epoch" of a padding sample: a repeat with loss weight 0


class DataError(RuntimeError):
    """The data cannot be trained on; the message names the flag."""


@dataclass(frozen=True)
class Entry:
    uid: str  # "<dataset name>/<item key>": unique over all datasets, stable across runs
    cache_index: int
    item: cache_format.CacheItem

    @property
    def bucket_wh(self) -> tuple[int, int]:
        return self.item.bucket_wh


Sample = tuple[int, int]  # (entry index, epoch whose permutation it belongs to, or PADDING_EPOCH)


def sample_weight(sample: Sample) -> float:
    """Loss weight of a planned sample: 1 for a real one, 0 for padding."""
    return 0.0 if sample[1] == PADDING_EPOCH else 1.0


def pad_batch(samples: Sequence[Sample], global_batch: int) -> list[Sample]:
    """`samples` (one bucket, fewer than a global batch) filled up with weight-0 repeats of their items."""
    return list(samples) + [(samples[j % len(samples)][0], PADDING_EPOCH) for j in range(global_batch - len(samples))]


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs (no hash randomisation)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def split_validation(uids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """Deterministic hold-out: the round(fraction * N) items with the smallest hash of (seed, uid).

    Independent of the input order and of the rank. At least one item when fraction > 0 and there are at
    least two items (so a small dataset still gets a validation loss, B18); never every item.
    """
    if fraction <= 0 or len(uids) < 2:
        return set()
    count = min(len(uids) - 1, max(1, round(fraction * len(uids))))
    ranked = sorted(uids, key=lambda u: (mix_seed(seed, "validation-split", u), u))
    return set(ranked[:count])


@dataclass
class EpochPlan:
    batches: list[list[Sample]]  # global batches trained this epoch, each from one bucket; a multiple of G
    leftovers: list[Sample]  # items carried into the next epoch (a bucket's remainder < a global batch)
    deferred: list[list[Sample]]  # whole batches carried into the next epoch (< G: not a full optimizer step)


def group_by_bucket(buckets: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, b in enumerate(buckets):
        groups[b].append(i)
    return dict(sorted(groups.items()))


def plan_epoch(
    buckets: Sequence[tuple[int, int]],
    carried: Sequence[Sample],
    deferred: Sequence[Sequence[Sample]],
    global_batch: int,
    accumulation_steps: int,
    seed: int,
    epoch: int,
    last: bool = False,
) -> EpochPlan:
    """Global batches of one epoch.

    Per bucket: the items carried from the previous epoch come first, then a seeded permutation of all
    the bucket's items. Carried items are kept out of the first batch's permutation part, so no batch ever
    holds an item twice. Each item of this epoch's permutation is used exactly once: in a batch now, or as a
    leftover at the start of the next epoch. A bucket smaller than a global batch is one batch padded with
    weight-0 repeats (`pad_batch`), every epoch. The batches of all buckets are shuffled together, after the
    batches deferred from the previous epoch; whatever does not fill a whole optimizer step (fewer than
    `accumulation_steps` batches) is deferred to the next epoch, so an epoch is always a whole number of
    optimizer steps and epoch boundaries (evaluation, saving) fall between optimizer steps. On the `last` epoch
    of a run nothing is carried: the leftovers form padded batches and the last optimizer step is completed
    with all-padding batches, so every item of the run is trained.
    """
    by_bucket = group_by_bucket(buckets)
    carried_by_bucket: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for s in carried:
        carried_by_bucket[buckets[s[0]]].append(s)
    batches: list[list[Sample]] = []
    leftovers: list[Sample] = []
    for bucket, members in by_bucket.items():
        perm = list(members)
        random.Random(mix_seed(seed, "permutation", epoch, bucket)).shuffle(perm)
        if len(members) < global_batch:
            batches.append(pad_batch([(i, epoch) for i in perm], global_batch))
            continue
        head_carried = carried_by_bucket.get(bucket, [])
        if head_carried:
            taken = {s[0] for s in head_carried}
            room = global_batch - len(head_carried)
            head = [i for i in perm if i not in taken][:room]
            head_set = set(head)
            perm = head + [i for i in perm if i not in head_set]
        pool = list(head_carried) + [(i, epoch) for i in perm]
        full = len(pool) // global_batch * global_batch
        batches += [pool[k : k + global_batch] for k in range(0, full, global_batch)]
        leftovers += pool[full:]
    random.Random(mix_seed(seed, "batch-order", epoch)).shuffle(batches)
    batches = [list(b) for b in deferred] + batches
    if last:
        by_leftover_bucket = group_by_bucket([buckets[s[0]] for s in leftovers])
        batches += [pad_batch([leftovers[k] for k in ks], global_batch) for ks in by_leftover_bucket.values()]
        filler = [(i, PADDING_EPOCH) for i, _ in batches[-1]] if batches else []
        batches += [list(filler) for _ in range(-len(batches) % accumulation_steps)]
        return EpochPlan(batches, [], [])
    trained = len(batches) // accumulation_steps * accumulation_steps
    return EpochPlan(batches[:trained], leftovers, batches[trained:])


def epoch_step_counts(
    bucket_sizes: Sequence[int], global_batch: int, accumulation_steps: int, num_epochs: int, last_flush: bool = False
) -> list[int]:
    """Optimizer steps in each epoch, from counts alone (no permutations): per bucket, carried + size items
    form (carried + size) // global_batch batches and leave the remainder (a bucket smaller than a global batch:
    one padded batch); batches that do not fill an optimizer step are deferred to the next epoch; with
    `last_flush` the final epoch trains the remainders and completes its last step. Matches `plan_epoch`."""
    carried = [0] * len(bucket_sizes)
    deferred = 0
    steps = []
    for epoch in range(num_epochs):
        batches = deferred
        for i, n in enumerate(bucket_sizes):
            if n < global_batch:
                batches += 1
                continue
            pool = carried[i] + n
            batches += pool // global_batch
            carried[i] = pool % global_batch
        if last_flush and epoch == num_epochs - 1:
            batches += sum(1 for c in carried if c)
            steps.append(-(-batches // accumulation_steps))
            break
        steps.append(batches // accumulation_steps)
        deferred = batches % accumulation_steps
    return steps


def padded_bucket_notes(entries: Sequence[Entry], global_batch: int) -> list[str]:
    """One line per bucket smaller than a global batch: trained every epoch in a padded batch."""
    by_bucket = group_by_bucket([e.bucket_wh for e in entries])
    return [
        f"bucket {b[0]}x{b[1]}: {len(m)} items < global batch {global_batch} (--train_batch_size x processes): "
        f"trained every epoch in a batch padded with {global_batch - len(m)} weight-0 repeats"
        for b, m in by_bucket.items()
        if len(m) < global_batch
    ]


def validation_batches(buckets: Sequence[tuple[int, int]], global_batch: int) -> list[list[tuple[int, float]]]:
    """Global validation batches covering every held-out item once: full chunks per bucket, and the last
    chunk padded to a full global batch by repeating items with weight 0 (every rank runs the same number
    of forward passes, FSDP needs that, and padding never changes the mean)."""
    batches = []
    for members in group_by_bucket(buckets).values():
        for k in range(0, len(members), global_batch):
            chunk = [(i, 1.0) for i in members[k : k + global_batch]]
            pad = [(chunk[j % len(chunk)][0], 0.0) for j in range(global_batch - len(chunk))]
            batches.append(chunk + pad)
    return batches


@dataclass
class SamplerState:
    """Where the data stream stands: checkpointed, so a resume continues with the very next batch."""

    epoch: int = 1  # the epoch being trained (1-based; epoch 0 is the base model)
    position: int = 0  # global batches of this epoch already consumed
    carried_in: list[Sample] = field(default_factory=list)  # leftover items carried into this epoch
    deferred_in: list[list[Sample]] = field(default_factory=list)  # whole batches carried into this epoch

    def to_json(self, entries: Sequence[Entry]) -> dict:
        def uids(samples: Sequence[Sample]) -> list:
            return [[entries[i].uid, e] for i, e in samples]

        return {
            "epoch": self.epoch,
            "position": self.position,
            "carried_in": uids(self.carried_in),
            "deferred_in": [uids(b) for b in self.deferred_in],
        }

    @classmethod
    def from_json(cls, value: dict, entries: Sequence[Entry]) -> SamplerState:
        index = {e.uid: i for i, e in enumerate(entries)}

        def samples(pairs: list) -> list[Sample]:
            missing = [uid for uid, _ in pairs if uid not in index]
            if missing:
                raise DataError(
                    f"--resume_from_checkpoint: {len(missing)} items of the saved data position are no longer in "
                    "the cache (or are now held out); resume with the same cache"
                )
            return [(index[u], int(e)) for u, e in pairs]

        return cls(
            int(value["epoch"]),
            int(value["position"]),
            samples(value["carried_in"]),
            [samples(b) for b in value["deferred_in"]],
        )


def rank_slice(global_batch: Sequence, rank: int, per_rank: int) -> list:
    return list(global_batch[rank * per_rank : (rank + 1) * per_rank])
