"""Noise options of the training step, drawn per item from the item's own generator (so that any rank layout
and any resume see the same numbers): noise offset (optionally of random strength), multi-resolution (pyramid)
noise, and input perturbation. Pure functions; tests/test_objective_math.py checks their statistics.

Written here rather than taken from a library: diffusers has the offset and the perturbation only inline in its
example scripts, and kohya's pyramid noise draws from the global RNG (not reproducible per item).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def offset_noise(
    noise: torch.Tensor, strength: float, generator: torch.Generator, random_strength: bool = False
) -> torch.Tensor:
    """noise + s * n_c with one standard normal n_c per channel, constant over the image (Guttenberg 2023):
    lets the model change an image's mean brightness. `random_strength`: s ~ U(0, strength) per item (kohya's
    `--noise_offset_random_strength`). `noise` is one item's (C, H, W)."""
    if random_strength:
        strength = strength * torch.rand((), generator=generator).item()
    per_channel = torch.randn((noise.shape[0], 1, 1), generator=generator, dtype=noise.dtype)
    return noise + strength * per_channel


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution (pyramid) noise (Whitaker 2023, kohya's `--multires_noise_iterations/discount`): white
    noise plus, for i = 1..iterations, noise drawn at a random 1/(2..4)^i of the size, upsampled bilinearly and
    scaled by discount^i; the sum is rescaled to unit standard deviation. Low-frequency components let the
    model learn large-scale structure. `noise` is one item's (C, H, W)."""
    channels, height, width = noise.shape
    out = noise.clone()
    for i in range(1, iterations + 1):
        factor = (2 + 2 * torch.rand((), generator=generator).item()) ** i
        h, w = max(1, int(height / factor)), max(1, int(width / factor))
        coarse = torch.randn((1, channels, h, w), generator=generator, dtype=noise.dtype)
        out += discount**i * F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        if h == 1 or w == 1:
            break
    return out / out.std()


def perturb_input_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, diffusers' `--input_perturbation`): the noisy input is made from
    noise + strength * n with a fresh n, while the target keeps `noise`; reduces exposure bias."""
    return noise + strength * torch.randn(noise.shape, generator=generator, dtype=noise.dtype)


@dataclass(frozen=True)
class NoiseOptions:
    offset: float = 0.0
    offset_random_strength: bool = False
    pyramid_iterations: int = 0
    pyramid_discount: float = 0.3
    input_perturbation: float = 0.0


def shape_noise(noise: torch.Tensor, options: NoiseOptions, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The item's training noise after the options (pyramid, then offset: the offset is the mean shift the
    normalization of the pyramid would remove), and with input perturbation also the noise of the UNet's
    input (`input_noise`). Draws nothing when every option is off, so default runs keep their random stream."""
    if options.pyramid_iterations > 0:
        noise = pyramid_noise(noise, generator, options.pyramid_iterations, options.pyramid_discount)
    if options.offset > 0:
        noise = offset_noise(noise, options.offset, generator, options.offset_random_strength)
    out = {"noise": noise}
    if options.input_perturbation > 0:
        out["input_noise"] = perturb_input_noise(noise, options.input_perturbation, generator)
    return out
