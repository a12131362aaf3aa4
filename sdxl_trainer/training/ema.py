"""Exponential moving average (EMA) of the trained weights, kept beside the optimizer and laid out like it: one
fp32 shadow per tensor the optimizer steps (each rank's local shards under FSDP2, the chunks of the flat fp32
master on one process), so no rank ever holds a full fp32 copy it would not hold anyway.

The decay follows diffusers' `EMAModel.get_decay` (warm-up `(1 + n) / (10 + n)`, or with `--ema_warmup` the power
schedule `1 - (1 + n / inv_gamma) ** -power`, capped by `--ema_decay`, floored by `--ema_min_decay`), where n counts
EMA updates; tests compare it with `EMAModel` itself. diffusers' class is not used for the weights because it
keeps one full copy of the model per process and knows nothing of shards or of the flat master.

For evaluation and saving, `swapped()` exchanges the shadows with the live weights in place (in small chunks,
exactly), so the optimizer's own full-state-dict gather gathers the EMA weights with no extra copy of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SWAP_CHUNK_ELEMENTS = 2**24  # 64 MiB of fp32 per temporary buffer while swapping
UPDATE_CHUNK_ELEMENTS = 2**26  # one host copy of at most 256 MiB per update chunk with --ema_device cpu


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The plain fp32 tensor of a trained weight: under `--fp8` with FSDP's float8 all-gather, torchao wraps each
    float8 weight in a tensor subclass around it (same storage); the EMA averages and swaps the storage itself."""
    t = t.detach()
    return t._tensor if type(t).__name__ == "WeightWithDynamicFloat8CastTensor" else t


class EmaError(RuntimeError):
    """The EMA cannot be built or resumed as asked; the message names the flag."""


@dataclass(frozen=True)
class EmaSchedule:
    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3
    update_every_steps: int = 1

    def decay_at(self, update_count: int) -> float:
        """The decay of the `update_count`-th EMA update (1-based), as diffusers' EMAModel computes it."""
        n = max(0, update_count - self.update_after_step - 1)
        if n <= 0:
            return 0.0  # the first update copies the weights
        value = 1 - (1 + n / self.inv_gamma) ** -self.power if self.warmup else (1 + n) / (10 + n)
        return max(min(value, self.decay), self.min_decay)


class EmaWeights:
    """fp32 shadows of `sources` (the optimizer's local fp32 tensors; aliases the optimizer keeps up to date)."""

    def __init__(self, sources: list[torch.Tensor], schedule: EmaSchedule, device: torch.device):
        bad = sorted({str(_plain(t).dtype) for t in sources if not _plain(t).is_floating_point()})
        if bad:
            raise EmaError(f"--use_ema: the trained weights are {', '.join(bad)}, not floating point")
        self.sources = sources
        self.schedule = schedule
        self.device = device
        # Always fp32, also over bf16 weights (--master_weights bf16_stochastic): the EMA then keeps the only fp32
        # copy, sharded like the weights, and small updates are not lost to bf16 rounding.
        self.shadows = [_plain(t).to(device=device, dtype=torch.float32, copy=True) for t in sources]
        self.exact_swap = all(_plain(t).dtype == torch.float32 for t in sources)

    def layout(self) -> list[list[int]]:
        return [list(t.shape) for t in self.shadows]

    @torch.no_grad()
    def update(self, optimizer_step: int) -> float | None:
        """After optimizer step `optimizer_step` (1-based): every `update_every_steps` steps, shadow <- decay *
        shadow + (1 - decay) * weights. Returns the decay used, None when this step does not update."""
        every = self.schedule.update_every_steps
        if optimizer_step % every:
            return None
        decay = self.schedule.decay_at(optimizer_step // every)
        same_device = all(s.device == t.device for s, t in zip(self.shadows, self.sources, strict=True))
        if same_device and self.exact_swap:
            torch._foreach_lerp_(self.shadows, [_plain(t) for t in self.sources], 1 - decay)
            return decay
        for shadow, source in zip(self.shadows, self.sources, strict=True):
            flat_s, flat_t = shadow.view(-1), _plain(source).reshape(-1)
            for start in range(0, flat_s.numel(), UPDATE_CHUNK_ELEMENTS):
                end = start + UPDATE_CHUNK_ELEMENTS
                flat_s[start:end].lerp_(flat_t[start:end].to(shadow.device, torch.float32), 1 - decay)
        return decay

    @torch.no_grad()
    def _swap(self) -> None:
        for shadow, source in zip(self.shadows, self.sources, strict=True):
            flat_s, flat_t = shadow.view(-1), _plain(source).view(-1)
            for start in range(0, flat_s.numel(), SWAP_CHUNK_ELEMENTS):
                end = start + SWAP_CHUNK_ELEMENTS
                held = flat_t[start:end].clone()
                flat_t[start:end].copy_(flat_s[start:end])
                flat_s[start:end].copy_(held)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: the live master weights hold the EMA weights; exact on exit. Only the masters change: use it to
        gather or save, not to run the model. fp32 masters exchange values with the shadows in place; bf16 weights
        (--master_weights bf16_stochastic) get the EMA rounded to bf16 while a copy of theirs waits on the EMA's
        device (the shadows keep their fp32 values)."""
        if self.exact_swap:
            self._swap()
            try:
                yield
            finally:
                self._swap()
            return
        with torch.no_grad():
            held = [_plain(t).to(self.device, copy=True) for t in self.sources]
            for shadow, source in zip(self.shadows, self.sources, strict=True):
                _plain(source).copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for kept, source in zip(held, self.sources, strict=True):
                    _plain(source).copy_(kept)

    def state_dict(self) -> dict:
        return {"layout": self.layout(), "schedule_decay": self.schedule.decay, "shadows": self.shadows}

    def load_state_dict(self, state: dict) -> None:
        if state["layout"] != self.layout():
            raise EmaError(
                "--resume_from_checkpoint: the checkpoint's EMA weights have another shard layout; resume with the "
                "same --sharding and number of processes"
            )
        for shadow, saved in zip(self.shadows, state["shadows"], strict=True):
            shadow.copy_(saved)


def full_state_dict(optimizer, unet: torch.nn.Module, ema: EmaWeights | None, use_ema: bool) -> dict:
    """Collective: the full fp32 UNet weights on rank 0 (EMA when `use_ema` and there is one), {} elsewhere."""
    if ema is None or not use_ema:
        return optimizer.full_model_state_dict(unet)
    with ema.swapped():
        full = optimizer.full_model_state_dict(unet)
        # A gather may return the live tensors themselves (FSDP2 on one CPU process): copy those before swapping back.
        live = {_plain(t).untyped_storage().data_ptr() for t in ema.sources}
        return {k: v.clone() if v.untyped_storage().data_ptr() in live else v for k, v in full.items()}
