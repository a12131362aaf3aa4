"""Upscaler and face restoration with random-weight networks in the real architectures (spandrel's classes)."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import save_file
from upscale_fixtures import (
    compact_state_dict,
    draw_face,
    esrgan_state_dict,
    save_weights,
    shared_gfpgan_file,
    to_basicsr_keys,
)

import upscale as upscale_cli
from sdxl_trainer.upscaling import face_restore, model_files
from sdxl_trainer.upscaling.folders import target_size
from sdxl_trainer.upscaling.model_files import UpscalerError
from sdxl_trainer.upscaling.tiles import Tile, axis_tiles, pil_to_tensor, plan_tiles, tensor_to_uint8
from sdxl_trainer.upscaling.upscaler import Upscaler


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """Small random RRDBNet (.pth and .safetensors, same weights), an x2plus-style one, a Compact model."""
    folder = tmp_path_factory.mktemp("upscale-weights")
    small = esrgan_state_dict(num_blocks=2, num_filters=32, basicsr_keys=False, seed=1)
    return {
        "esrgan_pth": save_weights(small, folder / "4x_small.pth"),
        "esrgan_st": save_weights(small, folder / "4x_small.safetensors"),
        "x2": save_weights(
            esrgan_state_dict(num_blocks=1, num_filters=16, basicsr_keys=False, pixel_unshuffle=2, seed=2),
            folder / "x2_small.pth",
        ),
        "compact": save_weights(compact_state_dict(seed=3), folder / "compact.safetensors"),
    }


@pytest.fixture(scope="module")
def gfpgan_path(tmp_path_factory):
    return shared_gfpgan_file(tmp_path_factory.getbasetemp())


def textured(width_px: int, height_px: int, seed: int = 0) -> Image.Image:
    """Smooth random colour texture: like a photo, unlike constant images that hide tiling errors."""
    rng = np.random.default_rng(seed)
    noise = (rng.random((height_px, width_px, 3)) * 255).astype(np.uint8)
    return Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5))


class CallCounter:
    """Wraps a spandrel descriptor to count network calls and the batch sizes they got."""

    def __init__(self, model) -> None:
        self.model, self.batches = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, batch):
        self.batches.append(batch.shape[0])
        return self.model(batch)


# --- tiling (pure) --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 31, 32, 33, 100, 257, 1000])
@pytest.mark.parametrize(("window", "overlap"), [(32, 4), (64, 16), (48, 0)])
def test_axis_tiles_partition_with_equal_windows_and_context(length, window, overlap):
    tiles = axis_tiles(length, window, overlap)
    assert tiles[0][0] == 0 and tiles[-1][1] == length
    for (_, end, _), (start, _, _) in zip(tiles[:-1], tiles[1:], strict=True):
        assert end == start  # cores partition the axis
    for start, end, win in tiles:
        win_len = min(length, window)
        assert 0 <= win and win + win_len <= length  # every window inside the image, same length
        assert win <= start and end <= win + win_len  # core inside its window
        assert start - win >= min(overlap, start)  # context before, unless the image ends there
        assert win + win_len - end >= min(overlap, length - end)
        assert end - start <= max(window - 2 * overlap, length if length <= window else 0)


@pytest.mark.parametrize("length", [4, 36, 100, 260])
def test_axis_tiles_aligned_boundaries_for_pixel_unshuffle_models(length):
    tiles = axis_tiles(length, 30, 5, align_px=4)  # windows of 28 px, 8 px of context (5 rounded up to 4s)
    assert tiles[-1][1] == length
    for start, end, win in tiles:
        assert start % 4 == end % 4 == win % 4 == 0
        assert win <= start and end <= win + min(length, 28)
    with pytest.raises(ValueError, match="multiple"):
        axis_tiles(37, 30, 5, align_px=4)


def test_plan_tiles_whole_image_when_it_fits_or_tiling_off():
    assert plan_tiles(50, 40, 0, 16) == [Tile(window=(0, 0, 50, 40), core=(0, 0, 50, 40))]
    assert len(plan_tiles(64, 64, 64, 16)) == 1
    assert len(plan_tiles(65, 64, 64, 16)) == 3  # ceil(65 / 32) cores along x
    with pytest.raises(ValueError, match="no core"):
        axis_tiles(100, 32, 16)


def test_target_size_rounds_and_never_returns_zero():
    assert target_size((100, 75), 1.5) == (150, 112)  # 112.5 rounds half to even
    assert target_size((3, 1), 0.1) == (1, 1)


# --- loading --------------------------------------------------------------------------------------------


def test_real_x4plus_shape_in_release_key_layout_loads(tmp_path):
    """23 blocks, 64 filters, basicsr key names under params_ema: exactly how RealESRGAN_x4plus.pth is stored."""
    old = esrgan_state_dict(seed=5, basicsr_keys=False)
    release = save_weights(to_basicsr_keys(old, num_blocks=23), tmp_path / "RealESRGAN_x4plus.pth")
    assert "body.22.rdb3.conv5.weight" in to_basicsr_keys(old, 23) and "conv_up2.weight" in to_basicsr_keys(old, 23)
    old_layout = save_weights(old, tmp_path / "old.safetensors")
    up = Upscaler(str(release), tile_px=0)
    assert (up.architecture, up.scale, up.model.tags) == ("ESRGAN", 4, ["64nf", "23nb"])
    assert sum(p.numel() for p in up.model.model.parameters()) == pytest.approx(16.7e6, rel=0.01)
    image = textured(12, 10)
    out = up.upscale(image, (48, 40))
    assert out.size == (48, 40)
    # the two key layouts are the same network
    assert np.array_equal(np.asarray(out), np.asarray(Upscaler(str(old_layout), tile_px=0).upscale(image, (48, 40))))


def test_pth_and_safetensors_give_identical_pixels(weights):
    image = textured(20, 14)
    a = Upscaler(str(weights["esrgan_pth"])).upscale(image, (80, 56))
    b = Upscaler(str(weights["esrgan_st"])).upscale(image, (80, 56))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).std() > 5  # not a constant image: the comparison means something


@pytest.mark.parametrize("key", ["esrgan_pth", "x2", "compact"])
@pytest.mark.parametrize("size_wh", [(80, 60), (37, 23), (150, 90), (15, 11), (100, 100)])
def test_output_has_exactly_the_requested_size(weights, key, size_wh):
    up = Upscaler(str(weights[key]), tile_px=24, tile_overlap_px=4)
    out = up.upscale(textured(20, 15), size_wh)
    assert out.size == size_wh and out.mode == "RGB"


def test_native_scale_output_is_the_network_output_without_resampling(weights):
    up = Upscaler(str(weights["x2"]), tile_px=0)
    assert up.scale == 2
    image = textured(13, 9)  # odd sizes: the x2plus model pads to a multiple of 4 internally
    out = up.upscale(image, (26, 18))
    direct = up.model(pil_to_tensor(image, 3)[None])[0]
    assert np.array_equal(np.asarray(out), tensor_to_uint8(direct).permute(1, 2, 0).numpy())


def test_modes_grey_and_alpha_are_kept(weights):
    up = Upscaler(str(weights["compact"]))
    grey = up.upscale(textured(16, 12).convert("L"), (40, 30))
    assert grey.mode == "L" and grey.size == (40, 30)
    rgba = textured(16, 12).convert("RGBA")
    rgba.putalpha(Image.new("L", (16, 12), 100))
    out = up.upscale(rgba, (32, 24))
    assert out.mode == "RGBA" and out.getchannel("A").getextrema() == (100, 100)
    sixteen = Image.fromarray(np.full((12, 16), 40000, dtype=np.uint16))  # 16-bit grey: 40000 / 257 = 156
    plain = up.upscale(Image.new("L", (16, 12), 156), (32, 24))
    assert np.array_equal(np.asarray(up.upscale(sixteen, (32, 24))), np.asarray(plain))


# --- tiling and batching against the untiled network -------------------------------------------------


@pytest.mark.parametrize("key", ["esrgan_pth", "compact", "x2"])
def test_tiled_output_equals_untiled_within_tolerance(weights, key):
    image = textured(70, 45, seed=7)
    whole = Upscaler(str(weights[key]), tile_px=0)
    tiled = Upscaler(str(weights[key]), tile_px=32, tile_overlap_px=8, batch_size=2)
    tiled.model = counter = CallCounter(tiled.model)
    size = (whole.scale * 70, whole.scale * 45)
    a = np.asarray(whole.upscale(image, size)).astype(int)
    b = np.asarray(tiled.upscale(image, size)).astype(int)
    assert sum(counter.batches) == len(plan_tiles(70, 45, 32, 8)) == 15  # it really ran 5 x 3 tiles
    assert max(counter.batches) == 2  # in batches
    diff = np.abs(a - b)
    assert diff.max() <= 3 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert a.std() > 5


def test_equal_size_images_share_a_network_call_and_match_single_runs(weights):
    up = Upscaler(str(weights["esrgan_pth"]), tile_px=0, batch_size=8)
    images = [textured(24, 16, seed=s) for s in range(3)] + [textured(10, 30, seed=9)]
    sizes = [(60, 40)] * 3 + [(25, 75)]
    singles = [np.asarray(up.upscale(i, s)) for i, s in zip(images, sizes, strict=True)]
    up.model = counter = CallCounter(up.model)
    together = up.upscale_many(images, sizes)
    assert sorted(counter.batches) == [1, 3]  # the three 24x16 images in one call
    for single, batched in zip(singles, together, strict=True):
        assert np.abs(single.astype(int) - np.asarray(batched).astype(int)).max() <= 1


# --- errors ---------------------------------------------------------------------------------------------


def test_missing_unknown_and_wrong_kind_of_weights_name_the_flag_and_file(tmp_path, weights, gfpgan_path):
    with pytest.raises(UpscalerError, match=r"--model: weights file .*nope\.pth.* does not exist"):
        Upscaler(str(tmp_path / "nope.pth"))
    unknown = tmp_path / "mystery.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(unknown))
    with pytest.raises(UpscalerError, match=r"--model: unknown architecture in .*mystery\.safetensors"):
        Upscaler(str(unknown))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a zip")
    with pytest.raises(UpscalerError, match=r"--model: cannot read weights file .*broken\.pth"):
        Upscaler(str(broken))
    with pytest.raises(UpscalerError, match=r"--model: .*GFPGAN.*pass it as --face_restore_model"):
        Upscaler(str(gfpgan_path))
    with pytest.raises(UpscalerError, match=r"--face_restore_model: .*4x_small\.pth.* is a ESRGAN model"):
        Upscaler(str(weights["esrgan_pth"]), str(weights["esrgan_pth"]))
    with pytest.raises(UpscalerError, match="--tile"):
        Upscaler(str(weights["compact"]), tile_px=20, tile_overlap_px=16)


def test_pickled_code_in_a_pth_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"params_ema": {"w": torch.zeros(1)}, "hook": logging.Logger}, evil)  # a class: needs unpickling
    with pytest.raises(UpscalerError, match="cannot read weights file"):
        Upscaler(str(evil))


def test_half_on_cpu_falls_back_to_fp32_with_a_warning(weights, caplog):
    with caplog.at_level(logging.WARNING):
        up = Upscaler(str(weights["compact"]), half=True)
    assert up.dtype == torch.float32 and "--half needs a CUDA device" in caplog.text


# --- the command line -----------------------------------------------------------------------------------


def _snapshot(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_cli_folder_loads_the_model_once_and_never_writes_the_input(tmp_path, weights, monkeypatch, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    textured(20, 16, 1).save(data / "a.png")
    textured(20, 16, 2).save(data / "b.jpg")
    textured(12, 18, 3).convert("L").save(data / "sub" / "c.png")
    (data / "broken.png").write_bytes(b"\x89PNG truncated")
    (data / "caption.txt").write_text("not an image")
    before = _snapshot(data)

    reads = []
    real_read = model_files.read_state_dict
    monkeypatch.setattr(model_files, "read_state_dict", lambda path: reads.append(path) or real_read(path))
    model = tmp_path / "fresh_copy.safetensors"  # a path no earlier test has loaded in this process
    model.write_bytes(weights["esrgan_st"].read_bytes())
    out = tmp_path / "out"
    argv = ["--input", str(data), "--output", str(out), "--model", str(model), "--scale", "1.5"]
    assert upscale_cli.main([*argv, "--tile", "16", "--tile_overlap", "4", "--device", "cpu"]) == 1  # broken.png
    assert reads == [model]  # one read for the whole folder
    assert _snapshot(data) == before
    sizes = {p.relative_to(out).as_posix(): Image.open(p).size for p in out.rglob("*") if p.is_file()}
    assert sizes == {"a.png": (30, 24), "b.png": (30, 24), "sub/c.png": (18, 27)}
    assert Image.open(out / "sub" / "c.png").mode == "L"
    captured = capsys.readouterr()
    assert "3 written" in captured.out and "broken.png: unreadable image" in captured.err

    # a second run keeps existing outputs, and a second Upscaler in this process reuses the loaded network
    assert upscale_cli.main([*argv, "--device", "cpu"]) == 1
    assert "3 already there" in capsys.readouterr().out
    assert len(reads) == 1


def test_cli_refuses_an_output_inside_the_input_and_reports_bad_weights(tmp_path, weights, capsys):
    data = tmp_path / "data"
    data.mkdir()
    textured(8, 8).save(data / "a.png")
    before = _snapshot(data)
    argv = ["--input", str(data), "--output", str(data / "up"), "--model", str(weights["compact"]), "--device", "cpu"]
    assert upscale_cli.main(argv) == 2
    assert "inside --input" in capsys.readouterr().err
    single = ["--input", str(data / "a.png"), "--output", str(data), "--model", str(weights["compact"])]
    assert upscale_cli.main([*single, "--device", "cpu", "--overwrite"]) == 1  # would replace its own input
    assert "would replace the input" in capsys.readouterr().err
    assert _snapshot(data) == before
    argv = [
        "--input",
        str(data),
        "--output",
        str(tmp_path / "o"),
        "--model",
        str(tmp_path / "x.pth"),
        "--device",
        "cpu",
    ]
    assert upscale_cli.main(argv) == 2
    assert "--model: weights file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        upscale_cli.main([*argv, "--half"])
    assert "--half needs a CUDA --device" in capsys.readouterr().err


# --- faces ----------------------------------------------------------------------------------------------


def test_similarity_from_two_points_maps_both_points_and_preserves_angles():
    src = np.array([[10.0, 20.0], [30.0, 25.0]])
    dst = np.array(face_restore.TEMPLATE_EYES_512)
    m = face_restore.similarity_from_two_points(src, dst)
    mapped = np.c_[src, np.ones(2)] @ m.T
    assert np.allclose(mapped, dst)
    linear = m[:, :2]
    assert np.allclose(linear @ linear.T, np.eye(2) * np.linalg.det(linear))  # rotation times uniform scale
    assert np.allclose(face_restore.compose(face_restore.invert(m), m), np.eye(3)[:2])


def test_feather_mask_is_one_inside_zero_at_the_border_and_monotone():
    mask = face_restore.feather_mask(64, feather_px=8)
    assert mask[32, 32] == 1.0 and mask[0, 32] < 0.02 and mask[32, 63] < 0.02
    assert np.all(np.diff(mask[32, :32]) >= 0)


def test_haar_detection_finds_the_drawn_face_and_its_eyes(gfpgan_path):
    restorer = face_restore.FaceRestorer(str(gfpgan_path), torch.device("cpu"))
    faces = restorer.detect_faces(np.asarray(draw_face(256)))
    assert len(faces) == 1 and faces[0].eyes_detected
    assert np.allclose(faces[0].eyes, [(104, 112), (152, 112)], atol=4)  # the drawn eye centres
    small = restorer.detect_faces(np.asarray(draw_face(128)))  # eyes too small for the eye cascade
    assert len(small) == 1 and not small[0].eyes_detected
    assert np.allclose(small[0].eyes, [(52, 56), (76, 56)], atol=6)  # estimated from the box
    assert restorer.detect_faces(np.asarray(textured(128, 128))) == []


def test_paste_back_lands_on_the_face_in_the_upscaled_image(gfpgan_path, monkeypatch):
    """With a 'restorer' that inverts colours, the inverted face must sit exactly over the upscaled face."""
    restorer = face_restore.FaceRestorer(str(gfpgan_path), torch.device("cpu"))
    monkeypatch.setattr(restorer, "restore", lambda crops: 255 - crops)
    source = draw_face(256)
    upscaled = source.resize((400, 360), Image.Resampling.LANCZOS)  # non-uniform scale on purpose
    out, count = restorer.restore_faces(source, upscaled)
    assert count == 1 and out.size == (400, 360)
    a, b = np.asarray(upscaled).astype(int), np.asarray(out).astype(int)
    centre = (slice(150, 200), slice(140, 260))  # eyes to mouth, well inside the feathered mask
    assert np.abs((255 - a[centre]) - b[centre]).mean() < 6
    assert np.array_equal(a[:15], b[:15]) and np.array_equal(a[:, :20], b[:, :20])  # outside the 512 crop: untouched


@pytest.mark.slow
def test_gfpgan_restores_faces_inside_the_face_region_only(weights, gfpgan_path):
    source = draw_face(128)
    plain = Upscaler(str(weights["compact"]), tile_px=0).upscale(source, (300, 300))
    faces = Upscaler(str(weights["compact"]), str(gfpgan_path), tile_px=0)
    out = faces.upscale(source, (300, 300))
    assert out.size == (300, 300) and faces.faces_restored == 1
    diff = np.abs(np.asarray(plain).astype(int) - np.asarray(out).astype(int)).sum(axis=2)
    assert diff[100:200, 100:200].mean() > 10  # the random GFPGAN changed the face
    # outside the footprint of the aligned 512 px crop (rows 12-269, columns 24-280 here): unchanged
    assert diff[:10].max() == 0 and diff[-25:].max() == 0 and diff[:, :20].max() == 0 and diff[:, -18:].max() == 0
    assert faces.fingerprint()["face_restore_model_sha256"] is not None
    # no face, no GFPGAN call
    faces.face_restorer.restore = lambda crops: pytest.fail("GFPGAN ran without a face")
    assert faces.upscale(textured(40, 40), (80, 80)).size == (80, 80)


def test_fingerprint_follows_file_content_not_path(tmp_path, weights):
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(weights["esrgan_st"].read_bytes())
    a = Upscaler(str(weights["esrgan_st"])).fingerprint()
    assert a == Upscaler(str(copy)).fingerprint()
    assert a["model_sha256"] != Upscaler(str(weights["compact"])).fingerprint()["model_sha256"]


@pytest.mark.gpu
def test_half_on_cuda_is_close_to_fp32(weights):
    image = textured(64, 48)
    fp32 = Upscaler(str(weights["esrgan_pth"]), device="cuda", tile_px=48).upscale(image, (256, 192))
    fp16_up = Upscaler(str(weights["esrgan_pth"]), device="cuda", tile_px=48, half=True)
    assert fp16_up.dtype == torch.float16
    fp16 = fp16_up.upscale(image, (256, 192))
    assert np.abs(np.asarray(fp32).astype(int) - np.asarray(fp16).astype(int)).mean() < 1.0


@pytest.mark.gpu
def test_faces_on_cuda_match_cpu(weights, gfpgan_path):
    source = draw_face(128)
    cpu = Upscaler(str(weights["compact"]), str(gfpgan_path), tile_px=0).upscale(source, (256, 256))
    gpu_up = Upscaler(str(weights["compact"]), str(gfpgan_path), device="cuda", tile_px=0, half=True)
    assert gpu_up.face_restorer.model.dtype == torch.float32  # GFPGAN stays fp32 under --half
    gpu = gpu_up.upscale(source, (256, 256))
    assert gpu_up.faces_restored == 1
    assert np.abs(np.asarray(cpu).astype(int) - np.asarray(gpu).astype(int)).mean() < 2.0


@pytest.mark.slow
def test_bench_smoke_prints_one_json_line_per_configuration(repo_root, capsys):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_upscale", repo_root / "bench" / "bench_upscale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--only", "fp32_whole_b2,fp32_tile16_b4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["config"] for r in rows) == ["fp32_tile16_b4", "fp32_whole_b2"]
    assert all(r["images_per_s"] > 0 and r["network_images_per_s"] > 0 for r in rows)
