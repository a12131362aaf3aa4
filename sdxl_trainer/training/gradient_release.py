"""The optimizer step inside backward (`--optimizer_step_in_backward`, gradient release): on FSDP2's local shards
(`GradientReleaseOptimizer`) and on the flat one-process layout (`FlatReleaseOptimizer`).

FSDP2 calls each sharded parameter's post-accumulate-grad hooks right after it has reduce-scattered that
parameter's gradient into its shard (torch `_fsdp_collectives.foreach_reduce`), i.e. as soon as the gradient is
final for this backward. The hook steps that tensor alone (`tensorwise.TensorwiseOptimizer.step_tensor`) and drops
the gradient, so the sharded gradients of the whole UNet never exist at once (bf16 SDXL: 4.8 GiB / shards saved).
The same pattern as torchtitan's `OptimizersInBackwardContainer` and kohya's `--fused_backward_pass`.

On one process (`--sharding none`, the default there) the flat layout keeps its chunked optimizer (few large
tensors; flat_master.py) but holds no flat gradient: each parameter's gradient is added into its chunk's gradient
buffer as soon as autograd has it and then freed; when the last parameter of a chunk has delivered, the chunk is
stepped and its buffer freed. A chunk is 2**25 elements, about one SDXL transformer block, and a backward finishes
chunks in about the order it reaches them, so only a few chunk buffers exist at once (bf16: 64 MiB each) instead
of the whole gradient (bf16 SDXL: 4.8 GiB). Chunks whose parameters got no gradient are stepped after backward
with a zero gradient, as the ordinary flat step would.

What it cannot do, refused at start (`memory_args.check_args`): global-norm clipping (every gradient is needed
before the first step) and fp16 loss scaling (the same). Gradient accumulation works, without the memory gain: the
hooks step only in the last micro-batch's backward; before it the gradients accumulate as usual (FSDP2: in the
sharded gradients; flat: in the chunk buffers, in the master weights' dtype). The gradient norm is still measured
(a sum of squares per rank, added up in the step's one all-gather). A non-finite gradient cannot be skipped after
the fact: the loss is still checked, and --max_nonfinite_steps still stops the run.
"""

from __future__ import annotations

import bisect

import torch

from sdxl_trainer.training.flat_master import BF16_CHUNK_ELEMENTS, FlatMasterOptimizer
from sdxl_trainer.training.optimizers import LocalShardOptimizer, _local

_TWICE = (
    "a parameter's gradient arrived twice in one backward; the step in backward needs each parameter's gradient "
    "once (use --no-optimizer_step_in_backward)"
)


class _StepsInBackward:
    """What both layouts share: arming, the gradient norm measured on the way, nothing left for `step()`."""

    steps_in_backward = True
    armed = False
    grad_sq: torch.Tensor | None = None  # this rank's sum of squared gradient elements, this step

    def _check_inner(self) -> None:
        if not hasattr(self.inner, "step_tensor"):
            raise TypeError("the step in backward needs an inner optimizer that steps one tensor (step_tensor)")

    def arm(self, last_micro_batch: bool) -> None:
        """Before each micro-batch's backward: step in this backward only if it is the optimizer step's last."""
        self.armed = last_micro_batch

    def _add_grad_sq(self, grad: torch.Tensor) -> None:
        sq = torch.linalg.vector_norm(grad, dtype=torch.float64).square()
        self.grad_sq = sq if self.grad_sq is None else self.grad_sq + sq

    def take_grad_sq(self, device: torch.device) -> torch.Tensor:
        """This rank's sum of squared gradients of the step just taken (then reset)."""
        sq = self.grad_sq if self.grad_sq is not None else torch.zeros((), dtype=torch.float64, device=device)
        self.grad_sq = None
        self.armed = False
        return sq

    def bind_grads(self) -> None:
        """Nothing to bind: the gradients were used and released in backward."""

    def step(self, bind: bool = True) -> None:
        """Nothing left to do: every tensor was stepped in backward."""


class GradientReleaseOptimizer(_StepsInBackward, LocalShardOptimizer):
    def __init__(self, params: list[torch.nn.Parameter], name: str, inner_factory):
        super().__init__(params, name, inner_factory)
        self._check_inner()
        self._index = {id(p): i for i, (p, _) in enumerate(self.pairs)}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self.armed or p.grad is None:
            return
        i = self._index.get(id(p))
        if i is not None:  # None: this rank's shard of p is empty
            loc = self.locals[i]
            shard = _local(p)
            if loc.data_ptr() != shard.data_ptr():
                loc.data = shard.detach()  # FSDP2 re-homed the shard (lazy init); keep the alias object
            loc.grad = _local(p.grad)
            self._add_grad_sq(loc.grad)
            self.inner.step_tensor(i)
            loc.grad = None
        p.grad = None  # released: the point of stepping here


class FlatReleaseOptimizer(_StepsInBackward, FlatMasterOptimizer):
    """The flat layout (flat_master.py) stepping each chunk in backward as soon as its gradient is complete."""

    holds_flat_gradients = False
    # fp32 masters too: an open chunk's gradient buffer is held until its last parameter's gradient arrives.
    chunk_elements = BF16_CHUNK_ELEMENTS

    def __init__(self, unet: torch.nn.Module, name: str, inner_factory, compute_dtype, device: torch.device,
                 bf16_weights: bool = False):  # fmt: skip
        super().__init__(unet, name, inner_factory, compute_dtype, device, bf16_weights)
        self._check_inner()
        self._buffers: dict[int, torch.Tensor] = {}  # open chunks' gradients (master dtype), by chunk index
        self._remaining: list[int] = []  # per chunk, gradient elements still to come in the armed backward
        # Each parameter's pieces: (chunk index, piece start and end in the parameter, piece start in the chunk).
        self._pieces: dict[int, list[tuple[int, int, int, int]]] = {}
        chunk_starts = [start for start, _ in self.chunk_spans]
        for p, (start, end, _) in zip(self.params, self.spans.values(), strict=True):
            pieces, at = [], start
            chunk = bisect.bisect_right(chunk_starts, at) - 1
            while at < end:
                chunk_start, chunk_end = self.chunk_spans[chunk]
                piece_end = min(end, chunk_end)
                pieces.append((chunk, at - start, piece_end - start, at - chunk_start))
                at, chunk = piece_end, chunk + 1
            self._pieces[id(p)] = pieces
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def arm(self, last_micro_batch: bool) -> None:
        super().arm(last_micro_batch)
        if last_micro_batch:
            self._remaining = [end - start for start, end in self.chunk_spans]

    def _buffer(self, chunk: int) -> torch.Tensor:
        if chunk not in self._buffers:
            start, end = self.chunk_spans[chunk]
            self._buffers[chunk] = torch.zeros(end - start, dtype=self.master.dtype, device=self.master.device)
        return self._buffers[chunk]

    def _hook(self, p: torch.nn.Parameter) -> None:
        if p.grad is None:
            return
        grad = p.grad.detach().reshape(-1)
        p.grad = None  # released: its elements live on in the chunk's buffer (cast to the master dtype)
        for chunk, begin, end, at in self._pieces[id(p)]:
            self._buffer(chunk)[at : at + end - begin].add_(grad[begin:end])
            if self.armed:
                if self._remaining[chunk] < end - begin:  # stepped already: its gradient would be lost
                    raise RuntimeError(_TWICE)
                self._remaining[chunk] -= end - begin
                if self._remaining[chunk] == 0:
                    self._step_chunk(chunk)

    def _step_chunk(self, chunk: int) -> None:
        self._remaining[chunk] = -1  # stepped
        view = self.locals[chunk]
        grad = self._buffers.pop(chunk, None)
        view.grad = grad.view(view.shape) if grad is not None else torch.zeros_like(view)
        self._add_grad_sq(view.grad)
        self.inner.step_tensor(chunk)
        view.grad = None
        self._refresh_compute(*self.chunk_spans[chunk])

    def after_backward(self) -> None:
        """After the armed backward, step the chunks some of whose parameters got no gradient (zeros for those)."""
        self.micro_batches += 1
        if self.armed:
            for chunk, remaining in enumerate(self._remaining):
                if remaining > 0:
                    self._step_chunk(chunk)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self._buffers.clear()
        self.micro_batches = 0
