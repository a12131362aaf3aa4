"""One process, no FSDP (`--sharding none`, the default on one GPU): the UNet computes in bf16/fp16 from one flat
buffer, and the fp32 master weights are stepped as a few large tensors.

Why: on one process there is nothing to shard, and what FSDP2 and a per-tensor optimizer step cost is per
tensor (SDXL has ~1,700): measured on one H200 in one run (`bench/bench_levers.py`, batch 8, full-size UNet),
FSDP2 on a 1-GPU mesh 11.6 images/s, fp32 master weights stepped tensor by tensor 12.0, this layout 16.4 with
AdamW and 15.0 with AdamW8bit (bitsandbytes launches its kernels once per tensor), plain bf16 weights without
master weights 16.7. The meaning is FSDP's mixed precision: bf16 compute weights cast from fp32 masters,
floating inputs cast to the compute dtype, gradients accumulated over micro-batches in fp32, the optimizer on
fp32 masters.

Layout: each trainable parameter of the UNet is a view into `compute` (flat, compute dtype) and its `.grad` a
view into `compute_grad`, into which autograd accumulates in place. `master` (flat fp32, same order) and its
gradient `master_grad` are what the optimizer steps, seen as:
  * chunks of at most 2**29 elements for elementwise optimizers (AdamW, AdamW8bit, Lion8bit: stepping a chunk
    is stepping its tensors), with the tensors that get 32-bit 8-bit-optimizer state (< 4096 elements, as
    `optim.eight_bit_state` decides on FSDP) in chunks of their own;
  * one view per parameter, in its shape, for Adafactor (it factors the second moment over rows and columns).

bf16 weights (`--master_weights bf16_stochastic`, `bf16_weights=True`): there is no fp32 master; `compute` (bf16)
is the trained weight and `compute_grad` its gradient (micro-batches accumulate into it in bf16). The inner
optimizer is then a `tensorwise.TensorwiseOptimizer` that steps each chunk's fp32 copy and rounds it back
stochastically; chunks are smaller (`BF16_CHUNK_ELEMENTS`) because that fp32 copy exists for one chunk at a time.
"""

from __future__ import annotations

import torch

from sdxl_trainer.training.optimizers import eight_bit_state

CHUNK_ELEMENTS = 2**29  # bitsandbytes indexes with 32-bit integers; SDXL's UNet has 2.6e9 elements
BF16_CHUNK_ELEMENTS = 2**25  # 128 MiB of fp32 (and as much for its gradient) while a chunk is stepped
ELEMENTWISE = {"adamw", "adamw8bit", "lion8bit"}


def cast_floating(value, dtype: torch.dtype):
    """Floating tensors in (nested) args/kwargs to `dtype`, as FSDP's mixed precision casts forward inputs."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(v, dtype) for v in value)
    return value


class FlatMasterOptimizer:
    """The optimizer interface of `optim.LocalShardOptimizer`, over flat fp32 master weights of a one-process UNet.

    `unet` must hold its fp32 weights (on any device); they become the masters, and the UNet's parameters become
    views of their compute-dtype copy on `device`.
    """

    # Whether autograd accumulates into the flat `compute_grad` (the parameters' .grad are views of it). The step in
    # backward (`gradient_release.FlatReleaseOptimizer`) has no flat gradient: each parameter's comes and goes.
    holds_flat_gradients = True
    chunk_elements: int | None = None  # None: by the weights (`CHUNK_ELEMENTS`, `BF16_CHUNK_ELEMENTS`)

    def __init__(self, unet: torch.nn.Module, name: str, inner_factory, compute_dtype, device: torch.device,
                 bf16_weights: bool = False):  # fmt: skip
        if bf16_weights and compute_dtype != torch.bfloat16:
            raise ValueError("bf16 weights compute in bf16 (--mixed_precision bf16)")
        self.name = name
        self.bf16_weights = bf16_weights
        if self.chunk_elements is None:
            self.chunk_elements = BF16_CHUNK_ELEMENTS if bf16_weights else CHUNK_ELEMENTS
        named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
        # Tensors with 32-bit optimizer state last, so that no chunk mixes the two kinds.
        named.sort(key=lambda item: not eight_bit_state(item[1].numel()))
        total = sum(p.numel() for _, p in named)
        self.compute = torch.empty(total, dtype=compute_dtype or torch.float32, device=device)
        # bf16 weights: the compute weights are what the optimizer steps (no copy).
        self.master = self.compute if bf16_weights else torch.empty(total, dtype=torch.float32, device=device)
        self.compute_grad = self.master_grad = None  # flat gradients: see `holds_flat_gradients`
        if self.holds_flat_gradients:
            self.compute_grad = torch.zeros_like(self.compute)
            self.master_grad = self.compute_grad if bf16_weights else torch.zeros_like(self.master)
        self.spans: dict[str, tuple[int, int, torch.Size]] = {}
        offset = 0
        for n, p in named:
            end = offset + p.numel()
            self.spans[n] = (offset, end, p.shape)
            self.master[offset:end].copy_(p.detach().reshape(-1))
            p.data = self.compute[offset:end].view(p.shape)
            if self.compute_grad is not None:
                p.grad = self.compute_grad[offset:end].view(p.shape)
            offset = end
        self._refresh_compute()
        self.params = [p for _, p in named]
        if compute_dtype is not None:
            unet.register_forward_pre_hook(
                lambda _m, args, kwargs: (cast_floating(args, compute_dtype), cast_floating(kwargs, compute_dtype)),
                with_kwargs=True,
            )
        # `name` may carry a kernel's suffix (`adamw8bit+fused`): chunking follows the optimizer itself.
        self.locals, decide_numels = self._optimizer_tensors(named, name.partition("+")[0] in ELEMENTWISE)
        self.inner = inner_factory(self.locals, decide_numels)
        self.micro_batches = 0

    def _optimizer_tensors(self, named, elementwise: bool) -> tuple[list[torch.nn.Parameter], list[int]]:
        """Views of the master weights (with their gradient views) for the inner optimizer, and for each the
        element count that decides 8- or 32-bit state."""
        tensors, numels = [], []
        self.chunk_spans: list[tuple[int, int]] = []  # each optimizer tensor's [start, end) in the flat buffers

        def add(start: int, end: int, shape, numel: int) -> None:
            view = torch.nn.Parameter(self.master[start:end].view(shape))
            if self.master_grad is not None:
                view.grad = self.master_grad[start:end].view(shape)
            tensors.append(view)
            numels.append(numel)
            self.chunk_spans.append((start, end))

        if not elementwise:
            for n, _ in named:
                start, end, shape = self.spans[n]
                add(start, end, shape, end - start)
            return tensors, numels
        # Each chunk's state precision is that of the tensors in it: pass the size of the largest one.
        sizes = [e - s for s, e, _ in self.spans.values()]
        large = [n for n in sizes if eight_bit_state(n)]
        small = [n for n in sizes if not eight_bit_state(n)]
        boundary = sum(large)  # the 8-bit-state tensors come first (see __init__)
        for region_start, region_end, decide in ((0, boundary, large), (boundary, len(self.master), small)):
            for start in range(region_start, region_end, self.chunk_elements):
                end = min(start + self.chunk_elements, region_end)
                add(start, end, (end - start,), max(decide))
        return tensors, numels

    @property
    def param_groups(self):
        return self.inner.param_groups

    def after_backward(self) -> None:
        """Move this micro-batch's gradient into the fp32 sum (no accumulation in bf16/fp16; bf16 weights: autograd
        has already added it to their bf16 gradient)."""
        self.micro_batches += 1
        if self.bf16_weights:
            return
        if self.micro_batches == 1:
            self.master_grad.copy_(self.compute_grad)
        else:
            self.master_grad.add_(self.compute_grad)
        self.compute_grad.zero_()

    def bind_grads(self) -> None:
        """Gradients are bound once and for all (views); kept for the interface."""

    def step(self, bind: bool = True) -> None:
        self.inner.step()
        self._refresh_compute()

    def _refresh_compute(self, start: int = 0, end: int | None = None) -> None:
        """The compute weights (elements start:end) from the fp32 masters; bf16 weights are their own."""
        if not self.bf16_weights:
            self.compute[start:end].copy_(self.master[start:end])

    def zero_grad(self) -> None:
        if self.bf16_weights:
            self.compute_grad.zero_()
        self.micro_batches = 0

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def layout(self) -> list[list[int]]:
        return [list(t.shape) for t in self.locals]

    # The weights: the fp32 masters, under the UNet's parameter names and shapes.

    def model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: self.master[s:e].view(shape) for n, (s, e, shape) in self.spans.items()}

    def load_model_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        views = self.model_state_dict(model)
        for n, view in views.items():
            if state[n].data_ptr() != view.data_ptr():
                view.copy_(state[n])
        self._refresh_compute()

    def full_model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full fp32 weights on the CPU (one process: it is rank 0)."""
        return {n: t.detach().to("cpu", copy=True) for n, t in self.model_state_dict(model).items()}
