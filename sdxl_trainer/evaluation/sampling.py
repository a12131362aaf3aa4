"""Sample prompts, seeded image generation and the sample grid (prompts row, "Base Model" row, one row per epoch).

The grid keeps every generated row as its own lossless PNG strip under `<run>/samples/rows/` and
recomposes the grid files from them, so no pixel is ever re-encoded from a lossy file (the seed appended
to a JPEG, B24). A grid file holds at most `max_rows` image rows; more rows go to further files, each
starting with the prompts row and the "Base Model" row so every file compares against the base model.
Every row uses the same seed per prompt (B23), so rows differ only by the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from sdxl_trainer.atomic_files import give_umask_mode

DEFAULT_SAMPLE_PROMPTS_FILE = Path(__file__).with_name("sample_prompts.txt")
_ROW_PATTERN = re.compile(r"^epoch_(\d{5,})\.png$")


class SamplePromptsError(ValueError):
    """The prompts file cannot be used; the message names the flag."""


def read_prompts_file(path: str | os.PathLike, flag: str = "--sample_prompts") -> list[str]:
    """Prompts in file order: one per line, blank lines and `#` comments skipped, duplicates dropped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SamplePromptsError(f"{flag}: {p} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise SamplePromptsError(f"{flag}: {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise SamplePromptsError(f"{flag}: cannot read {p}: {exc}") from exc
    lines = (line.strip() for line in text.splitlines())
    return list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


def choose_sample_prompts(file_prompts: Sequence[str], captions: Sequence[str], count: int) -> list[str]:
    """Exactly `count` prompts (fewer only if there are not enough): the file's first ones, then captions.

    Captions are topped up in a fixed order (by the SHA-256 of their text), so every rank and every run
    picks the same ones, unlike the seed's random.choice plus alphabetical sort (B44).
    """
    prompts = list(dict.fromkeys(file_prompts))[:count]
    if len(prompts) < count:
        chosen = set(prompts)
        pool = sorted(
            {c.strip() for c in captions if c.strip()} - chosen, key=lambda c: hashlib.sha256(c.encode()).digest()
        )
        prompts += pool[: count - len(prompts)]
    return prompts


def prompt_seeds(base_seed: int, count: int) -> list[int]:
    """The seed of each prompt position: the same in every row, so rows compare."""
    return [base_seed + i for i in range(count)]


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    width_px: int,
    height_px: int,
    steps: int,
    guidance_scale: float,
    batch_size: int = 1,
    guidance_rescale: float = 0.0,
) -> list[Image.Image]:
    """One image per (prompt, seed). Each image has its own CPU generator, so it does not depend on the
    batch it lands in, on the rank that makes it, or on any global RNG (the training RNG is untouched)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        out = pipe(
            prompt=chunk,
            width=width_px,
            height=height_px,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            generator=generators,
            output_type="pil",
        )
        images += [im.convert("RGB") for im in out.images]
    return images


# --------------------------------------------------------------------------------------------------
# Text tiles
# --------------------------------------------------------------------------------------------------


def _font(size_px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size_px)  # Pillow's built-in scalable font: nothing to ship


def _wrap_to_width(text: str, font: ImageFont.FreeTypeFont, width_px: int) -> list[str]:
    """Greedy word wrap by measured pixel width; a word longer than the line is broken by characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width_px:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:
            if font.getlength(line + ch) > width_px and line:
                lines.append(line)
                line = ""
            line += ch
    if line:
        lines.append(line)
    return lines


def render_prompt_tile(text: str, size_wh: tuple[int, int]) -> Image.Image:
    """A white tile with the prompt wrapped inside it; the font shrinks (then the text is cut with an
    ellipsis) so a long prompt never spills out of its tile."""
    width, height = size_wh
    tile = Image.new("RGB", size_wh, "white")
    margin = max(2, width // 50)
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    size = max(8, width // 14)  # start large; shrink until the prompt fits
    while True:
        font = _font(size)
        line_h = int(size * 1.25)
        lines = _wrap_to_width(text, font, inner_w)
        if len(lines) * line_h <= inner_h or size <= 8:
            break
        size = max(8, int(size * 0.85))
    max_lines = max(1, inner_h // line_h)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "…") > inner_w:
            last = last[:-1]
        lines[-1] = last + "…"
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_h), line, fill="black", font=font)
    return tile


def render_label_tile(label: str, size_wh: tuple[int, int]) -> Image.Image:
    """A white tile with a row label ("Base Model", "Epoch: 12"), vertically centred."""
    width, height = size_wh
    tile = Image.new("RGB", size_wh, "white")
    size = max(10, width // 14)
    font = _font(size)
    while font.getlength(label) > width - 8 and size > 8:
        size -= 1
        font = _font(size)
    ImageDraw.Draw(tile).text((max(2, width // 100), height // 2), label, fill="black", font=font, anchor="lm")
    return tile


def row_label(epoch: int) -> str:
    return "Base Model" if epoch == 0 else f"Epoch: {epoch}"


# --------------------------------------------------------------------------------------------------
# The grid on disk
# --------------------------------------------------------------------------------------------------


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        give_umask_mode(tmp)  # readable by others as the umask allows (mkstemp makes 0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class SampleGrid:
    """Rows of sample images under `folder`, composed into `sample_grid_NNN.png` files.

    `settings` (prompts, seeds, size, steps, guidance) is stored as `settings.json`; rows made with other
    settings are not comparable, so when a resumed run changes them the old folder is moved aside
    (`samples.previous-N`), never deleted.
    """

    def __init__(self, folder: Path, settings: dict, max_rows: int = 20):
        if max_rows < 2:
            raise ValueError("--sample_grid_max_rows must be at least 2 (the Base Model row plus one epoch)")
        self.folder = Path(folder)
        self.prompts: list[str] = list(settings["prompts"])
        self.max_rows = max_rows
        self.settings_path = self.folder / "settings.json"
        self.rows_dir = self.folder / "rows"
        self.moved_aside: Path | None = None
        if self.settings_path.is_file() and json.loads(self.settings_path.read_text("utf-8")) != settings:
            n = 1
            while (aside := self.folder.with_name(f"{self.folder.name}.previous-{n}")).exists():
                n += 1
            shutil.move(str(self.folder), aside)
            self.moved_aside = aside
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        if not self.settings_path.is_file():
            tmp = self.settings_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(settings, indent=1, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, self.settings_path)

    def row_path(self, epoch: int) -> Path:
        return self.rows_dir / f"epoch_{epoch:05d}.png"

    def row_epochs(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.rows_dir.iterdir() if (m := _ROW_PATTERN.match(p.name)))

    def add_row(self, epoch: int, images: Sequence[Image.Image]) -> list[Path]:
        """Store one row (images in prompt order) and rewrite the grid file that holds it; returns the
        grid files written."""
        if len(images) != len(self.prompts):
            raise ValueError(f"a row needs {len(self.prompts)} images, got {len(images)}")
        w, h = images[0].size
        if any(im.size != (w, h) for im in images):
            raise ValueError("all images of a row must have the same size")
        strip = Image.new("RGB", (w * len(images), h), "white")
        for i, im in enumerate(images):
            strip.paste(im.convert("RGB"), (i * w, 0))
        _save_png_atomic(strip, self.row_path(epoch))
        return self.compose(only_epoch=epoch)

    def _parts(self) -> list[list[int]]:
        """Epoch rows per grid file: the Base Model row (epoch 0) heads every file."""
        epochs = self.row_epochs()
        has_base = bool(epochs) and epochs[0] == 0
        rest = epochs[1:] if has_base else epochs
        per_file = self.max_rows - 1 if has_base else self.max_rows
        chunks = [rest[i : i + per_file] for i in range(0, len(rest), per_file)] or [[]]
        return [([0] if has_base else []) + chunk for chunk in chunks]

    def part_path(self, index: int) -> Path:
        return self.folder / f"sample_grid_{index + 1:03d}.png"

    def compose(self, only_epoch: int | None = None) -> list[Path]:
        """Write the grid files from the rows on disk (only the one containing `only_epoch` if given)."""
        written = []
        parts = self._parts()
        for index, epochs in enumerate(parts):
            if not epochs or (only_epoch is not None and only_epoch not in epochs):
                continue
            image = self.render(epochs)
            _save_png_atomic(image, self.part_path(index))
            written.append(self.part_path(index))
        return written

    def render(self, epochs: Sequence[int], include_header: bool = True) -> Image.Image:
        """Prompts row (optional) then one labelled row per epoch."""
        strips = []
        for epoch in epochs:
            with Image.open(self.row_path(epoch)) as im:
                strips.append(im.convert("RGB"))
        w, h = strips[0].width // len(self.prompts), strips[0].height
        rows = len(strips) + (1 if include_header else 0)
        grid = Image.new("RGB", (w * (len(self.prompts) + 1), h * rows), "white")
        y = 0
        if include_header:
            for i, prompt in enumerate(self.prompts):
                grid.paste(render_prompt_tile(prompt, (w, h)), ((i + 1) * w, 0))
            y = h
        for epoch, strip in zip(epochs, strips, strict=True):
            grid.paste(render_label_tile(row_label(epoch), (w, h)), (0, y))
            grid.paste(strip.resize((w * len(self.prompts), h)) if strip.height != h else strip, (w, y))
            y += h
        return grid
