"""sample_dataset/ is what its generator makes, and it exercises what the caching step must handle."""

from __future__ import annotations

import importlib.util

from PIL import Image

from sdxl_trainer.data.images import discover_items


def _load_generator(repo_root):
    spec = importlib.util.spec_from_file_location("make_sample_dataset", repo_root / "scripts/make_sample_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_sample_dataset_is_the_generators_output(repo_root, tmp_path):
    _load_generator(repo_root).make(tmp_path / "fresh")
    committed = repo_root / "sample_dataset"
    files = sorted(p.relative_to(committed).as_posix() for p in committed.rglob("*") if p.is_file())
    fresh = sorted(p.relative_to(tmp_path / "fresh").as_posix() for p in (tmp_path / "fresh").rglob("*") if p.is_file())
    assert files == fresh
    for rel in files:
        assert (committed / rel).read_bytes() == (tmp_path / "fresh" / rel).read_bytes(), rel


def test_sample_dataset_covers_the_hard_cases(repo_root):
    folder = repo_root / "sample_dataset"
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 5 * 2**20
    items, skipped = discover_items(folder)
    assert 28 <= len(items) <= 40 and skipped == []
    sizes = {i.relpath: Image.open(i.image_path).size for i in items}
    modes = {Image.open(i.image_path).mode for i in items}
    aspects = [w / h for w, h in sizes.values()]
    assert min(aspects) <= 1 / 3 + 1e-6 and max(aspects) >= 3 - 1e-6
    assert min(w * h for w, h in sizes.values()) < 256**2 and max(w * h for w, h in sizes.values()) > 1024**2
    assert {"RGBA", "P", "LA", "CMYK", "I;16", "L"} <= modes
    suffixes = {i.image_path.suffix.lower() for i in items}
    assert {".png", ".jpg", ".webp", ".bmp", ".tiff"} <= suffixes
    assert any("/" in i.relpath for i in items) and any(i.relpath.count("/") >= 2 for i in items)
    assert any(" " in r and "#" in r and not r.isascii() for r in sizes)
    assert any(Image.open(i.image_path).getexif().get(0x0112, 1) != 1 for i in items)  # EXIF-rotated
    png16 = (folder / "formats" / "rgb16.png").read_bytes()
    assert png16[24] == 16 and png16[25] == 2  # IHDR: 16-bit RGB
    palette = Image.open(folder / "formats" / "palette_transparent.png")
    assert "transparency" in palette.info
    notes = [i.caption_note or "" for i in items]
    assert any("no caption" in n for n in notes) and any("not UTF-8" in n for n in notes)
    assert max(len(i.caption.split()) for i in items) > 77  # far more than 77 tokens
