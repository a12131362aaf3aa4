"""Sample prompts, seeded generation and the lossless, tiled sample grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdxl_trainer.evaluation import sampling


def test_prompts_file_keeps_order_skips_comments_and_duplicates(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\nzebra at noon\n\n  apple tree  \nzebra at noon\nBanana\n", encoding="utf-8")
    assert sampling.read_prompts_file(f) == ["zebra at noon", "apple tree", "Banana"]
    with pytest.raises(sampling.SamplePromptsError, match="--sample_prompts: .* does not exist"):
        sampling.read_prompts_file(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(sampling.SamplePromptsError, match="--sample_prompts: .* not UTF-8"):
        sampling.read_prompts_file(tmp_path / "latin1.txt")


def test_default_prompts_file_has_fourteen_prompts():
    assert len(sampling.read_prompts_file(sampling.DEFAULT_SAMPLE_PROMPTS_FILE)) == 14


def test_prompt_choice_is_exact_and_deterministic():
    file_prompts = ["p1", "p2", "p3"]
    assert sampling.choose_sample_prompts(file_prompts, ["c"], 2) == ["p1", "p2"]  # a cap, not a minimum
    captions = ["cap d", "cap a", "", "cap c", "cap b", "cap a", "p1"]
    chosen = sampling.choose_sample_prompts(file_prompts, captions, 6)
    assert chosen[:3] == file_prompts and len(chosen) == 6 == len(set(chosen))
    assert set(chosen[3:]) <= {"cap a", "cap b", "cap c", "cap d"}
    # Any caption order (ranks, runs) picks the same captions in the same order.
    assert sampling.choose_sample_prompts(file_prompts, list(reversed(captions)), 6) == chosen
    assert sampling.choose_sample_prompts([], ["only"], 4) == ["only"]
    assert sampling.prompt_seeds(7, 3) == [7, 8, 9]


def test_long_prompt_stays_inside_its_tile():
    tile = sampling.render_prompt_tile("word " * 400, (96, 96))
    pixels = np.asarray(tile)
    assert tile.size == (96, 96) and (pixels < 128).any()
    margin = max(2, 96 // 50)
    assert (pixels[-margin:, :] == 255).all() and (pixels[:, -margin:] == 255).all()
    assert sampling.render_label_tile("Epoch: 123456", (64, 64)).size == (64, 64)


def _row(seed: int, n: int = 3, size=(24, 16)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _settings(prompts=("a", "b", "c")) -> dict:
    return {"prompts": list(prompts), "seeds": [0, 1, 2], "width_px": 24, "height_px": 16}


def test_grid_is_lossless_and_tiles_into_several_files(tmp_path):
    grid = sampling.SampleGrid(tmp_path / "samples", _settings(), max_rows=3)
    rows = {epoch: _row(epoch) for epoch in (0, 2, 4, 6, 8)}
    for epoch, images in rows.items():
        grid.add_row(epoch, images)
    files = sorted((tmp_path / "samples").glob("sample_grid_*.png"))
    # Base row + two epoch rows per file: epochs 2,4 | 6,8.
    assert [f.name for f in files] == ["sample_grid_001.png", "sample_grid_002.png"]
    w, h = 24, 16
    for f, epochs in zip(files, ([0, 2, 4], [0, 6, 8]), strict=True):
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size == (w * 4, h * 4)  # label column + 3 prompts; header + 3 rows
            pixels = np.asarray(im.convert("RGB"))
        for r, epoch in enumerate(epochs, start=1):
            for c, tile in enumerate(rows[epoch], start=1):
                np.testing.assert_array_equal(pixels[r * h : (r + 1) * h, c * w : (c + 1) * w], np.asarray(tile))
    # A new row only rewrites the file that holds it.
    before = files[0].stat().st_mtime_ns
    grid.add_row(10, _row(10))
    assert files[0].stat().st_mtime_ns == before and (tmp_path / "samples" / "sample_grid_003.png").is_file()


def test_changed_settings_move_old_rows_aside(tmp_path):
    sampling.SampleGrid(tmp_path / "samples", _settings(), max_rows=5).add_row(0, _row(0))
    grid = sampling.SampleGrid(tmp_path / "samples", _settings(("x", "y", "z")), max_rows=5)
    assert grid.moved_aside == tmp_path / "samples.previous-1"
    assert (grid.moved_aside / "rows" / "epoch_00000.png").is_file()
    assert grid.row_epochs() == []
    assert json.loads((tmp_path / "samples" / "settings.json").read_text())["prompts"] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="--sample_grid_max_rows"):
        sampling.SampleGrid(tmp_path / "other", _settings(), max_rows=1)


def test_generation_is_fixed_by_seed_and_independent_of_batching(tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a house", "a house"], [5, 7]
    one = sampling.generate_images(pipe, prompts, seeds, 64, 64, steps=2, guidance_scale=5.0, batch_size=1)
    again = sampling.generate_images(pipe, prompts[:1], seeds[:1], 64, 64, steps=2, guidance_scale=5.0)
    batched = sampling.generate_images(pipe, prompts, seeds, 64, 64, steps=2, guidance_scale=5.0, batch_size=2)
    arrays = [np.asarray(im, dtype=np.int16) for im in one]
    np.testing.assert_array_equal(arrays[0], np.asarray(again[0], dtype=np.int16))
    for a, b in zip(arrays, batched, strict=True):
        assert np.abs(a - np.asarray(b, dtype=np.int16)).max() <= 1  # batched kernels may round differently
    assert np.abs(arrays[0] - arrays[1]).mean() > 1.0  # same prompt, other seed: another image
