"""The bucket rule (seed_reference §2.5-2.6), its worked examples (§2.13) and the off-by-one fix (§2.8)."""

from __future__ import annotations

import random

import pytest

from sdxl_trainer.data.buckets import buckets_for_key, category_key, closest_bucket, cover_resize, plan_item

# §2.6: number of buckets per key, 256..2048.
SEED_BUCKET_COUNTS = dict(
    zip(
        range(256, 2049, 64),
        [
            5,
            7,
            9,
            9,
            11,
            13,
            15,
            15,
            17,
            17,
            19,
            21,
            23,
            25,
            23,
            27,
            29,
            27,
            31,
            33,
            33,
            33,
            37,
            39,
            39,
            41,
            41,
            41,
            43,
        ],
        strict=True,
    )
)
SEED_1024 = (
    "704x1408 704x1344 768x1344 768x1280 768x1216 832x1216 832x1152 896x1152 896x1088 960x1088 960x1024 "
    "1024x1024 1024x960 1088x960 1088x896 1152x896 1152x832 1216x832 1216x768 1280x768 1344x768 1344x704 1408x704"
)
A = dict(min_resolution=256, max_resolution=1024, upscale_to_resolution=1024)
B = dict(min_resolution=512, max_resolution=1536, upscale_to_resolution=None)


def test_generated_table_matches_the_seed_table_counts_and_rule():
    for key, count in SEED_BUCKET_COUNTS.items():
        buckets = buckets_for_key(key)
        assert len(buckets) == count, key
        for w, h in buckets:
            assert w % 64 == 0 and h % 64 == 0
            assert (key - 64) ** 2 < w * h <= key**2
            assert 0.5 <= w / h <= 2.0
        areas = [w * h for w, h in buckets]
        assert areas == sorted(areas, reverse=True)
        assert len({w / h for w, h in buckets}) == len(buckets)  # no two share an aspect ratio


def test_key_1024_holds_exactly_the_seed_buckets():
    listed = sorted(tuple(int(x) for x in b.split("x")) for b in SEED_1024.split())
    assert sorted(buckets_for_key(1024)) == listed


def test_category_rounds_up_clamps_to_max_and_skips_small_images():
    assert category_key(1000, 700, 512, 1536) == 832  # s = 783 -> next key up
    assert category_key(3000, 2000, 256, 1024) == 1024  # larger than every key -> max
    assert category_key(300, 200, 256, 1024) is None  # 256x192 < 256^2
    assert category_key(600, 300, 256, 1024) == 384  # one short side is fine when the area passes
    assert category_key(257, 257, 256, 1024) == 256


# §2.13 rows. "resized" is the fixed cover size; the seed's 1088x1663 row (the off-by-one) is 1088x1664 here.
# Upscaled rows: original_size is the true source size (the seed floored it to 64), and the upscaler sees
# only the region that the crop keeps.
VECTORS = [
    ((1100, 1681), A, 1024, (768, 1216), (795, 1216), (1216, 768, 0, 13, 1216, 768), False),
    ((1100, 1681), B, 1408, (1088, 1664), (1088, 1664), (1664, 1088, 0, 0, 1664, 1088), False),
    ((360, 551), A, 1024, (768, 1216), (794, 1216), (551, 360, 0, 13, 1216, 768), True),
    ((1000, 700), A, 1024, (1216, 832), (1216, 851), (700, 1000, 9, 0, 832, 1216), True),
    ((1000, 700), B, 832, (960, 704), (1005, 704), (704, 960, 0, 22, 704, 960), False),
    ((3000, 2000), A, 1024, (1216, 832), (1248, 832), (832, 1216, 0, 16, 832, 1216), False),
    ((600, 600), A, 1024, (1024, 1024), (1024, 1024), (600, 600, 0, 0, 1024, 1024), True),
    ((600, 600), B, 576, (576, 576), (576, 576), (576, 576, 0, 0, 576, 576), False),
    ((2000, 500), A, 1024, (1408, 704), (2816, 704), (500, 2000, 0, 704, 704, 1408), True),
]


@pytest.mark.parametrize("size, setting, key, bucket, resized, time_ids, upscaler", VECTORS)
def test_worked_examples(size, setting, key, bucket, resized, time_ids, upscaler):
    plan = plan_item(*size, **setting)
    assert plan.category_key == key
    assert plan.bucket_wh == bucket
    assert plan.resized_wh == resized
    assert plan.time_ids == time_ids
    assert plan.use_upscaler == upscaler


@pytest.mark.parametrize("size, setting", [((360, 551), B), ((300, 200), A), ((300, 200), B)])
def test_worked_examples_that_are_skipped(size, setting):
    assert plan_item(*size, **setting) is None


def test_resize_always_covers_the_bucket_and_crops_are_never_negative():
    rng = random.Random(0)
    sizes = [(rng.randint(64, 5000), rng.randint(64, 5000)) for _ in range(3000)]
    sizes += [(w, h) for w in range(1000, 1200, 7) for h in range(1600, 1700, 3)]  # around the §2.8 example
    settings = [A, B, dict(min_resolution=256, max_resolution=2048, upscale_to_resolution=None)]
    for w, h in sizes:
        for setting in settings:
            plan = plan_item(w, h, **setting)
            if plan is None:
                continue
            (rw, rh), (bw, bh), (top, left) = plan.resized_wh, plan.bucket_wh, plan.crop_top_left
            assert rw >= bw and rh >= bh, (w, h, plan)
            assert rw == bw or rh == bh  # just covers: one side is exact
            assert top >= 0 and left >= 0 and top + bh <= rh and left + bw <= rw
            x0, y0, x1, y1 = plan.source_box
            assert -1e-9 <= x0 < x1 <= w + 1e-9 and -1e-9 <= y0 < y1 <= h + 1e-9
            assert abs((x1 - x0) / (y1 - y0) - bw / bh) < 0.02


def test_cover_resize_is_exact_where_the_float_version_was_one_pixel_short():
    assert cover_resize(1100, 1681, (1088, 1664)) == (1088, 1664)


def test_extreme_aspect_upscale_only_works_on_the_region_kept():
    plan = plan_item(2000, 500, **A)
    x0, y0, x1, y1 = plan.source_box
    assert (x0, y0, x1, y1) == pytest.approx((500, 0, 1500, 500))  # half the source is never upscaled


def test_small_upscale_factors_are_plain_resampling():
    # 950x950: category 960 < 1024 -> upscale path, but only x1.078: no upscaler pass, native-quality conditioning
    plan = plan_item(950, 950, **A)
    assert plan.bucket_wh == (1024, 1024) and not plan.use_upscaler
    assert plan.original_size_hw == (1024, 1024)
    assert plan_item(950, 950, **A, upscale_min_factor=1.05).use_upscaler


def test_closest_bucket_matches_aspect():
    assert closest_bucket(1024, 1000, 1000) == (1024, 1024)
    assert closest_bucket(1024, 3000, 1000) == (1408, 704)  # beyond 2:1 -> the widest bucket
    assert closest_bucket(1024, 1000, 3000) == (704, 1408)
