"""Stochastic rounding of fp32 values to bf16, and the random stream it draws from.

Why: with bf16 trained weights and no fp32 master copy, an update smaller than half a bf16 step (2**-8 of the
weight) is lost by round-to-nearest every time, so small learning rates stop training. Rounding up with the
probability of the distance to the lower neighbour keeps every update in expectation (E[round(x)] = x).

Written here rather than taken from torchao (`torchao.optim._AdamBase(bf16_stochastic_round=True)`): torchao's
rounding lives inside its own compiled Adam step (one compilation per parameter shape, the learning rate must be a
tensor, which diffusers' schedules replace by a float, and it draws from the global RNG), while this project wraps
the optimizers it already uses (bitsandbytes AdamW8bit, torch AdamW, Adafactor) and keeps the rounding's random
stream in a generator of its own that the checkpoint saves (exact resume).
"""

from __future__ import annotations

import torch

_LOW_BITS = 1 << 16  # bf16 is the upper 16 bits of an fp32
_GENERATORS: dict[str, torch.Generator] = {}


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """bf16 tensor equal to `x` (fp32) in expectation: add a uniform random integer in [0, 2**16) to the low 16
    bits of each fp32 bit pattern, then drop them. fp32 is sign-magnitude, so this rounds the magnitude up with
    probability (distance to the lower bf16 neighbour) / (bf16 step) for negative values too.

    ±inf stay ±inf and NaNs as computed (canonical, upper mantissa bits set) stay NaN; values within the last
    bf16 step below the largest finite one may round to inf, as round-to-nearest does above its midpoint. Two
    temporaries (the int32 noise and the bf16 result): it runs on 2**25-element chunks of a 24 GiB card."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 takes fp32, got {x.dtype}")
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    noise.add_(x.contiguous().view(torch.int32)).bitwise_and_(-_LOW_BITS)  # -2**16 == 0xFFFF0000 as int32
    return noise.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def rounding_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """The rounding's random stream on `device` (one per device in this process). `seed` (re)seeds it."""
    key = str(torch.device(device))
    if key not in _GENERATORS:
        _GENERATORS[key] = torch.Generator(device=key)
        _GENERATORS[key].manual_seed(0 if seed is None else seed)
    elif seed is not None:
        _GENERATORS[key].manual_seed(seed)
    return _GENERATORS[key]


def generator_states() -> dict[str, torch.Tensor]:
    """Every rounding stream's state, by device name (the checkpoint's RNG file holds it)."""
    return {key: g.get_state() for key, g in _GENERATORS.items()}


def set_generator_states(states: dict[str, torch.Tensor]) -> None:
    for key, state in states.items():
        rounding_generator(key).set_state(state.to(torch.uint8).cpu())
