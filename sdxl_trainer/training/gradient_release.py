"""The optimizer step inside backward (`--optimizer_step_in_backward`, gradient release) on FSDP2's local shards.

FSDP2 calls each sharded parameter's post-accumulate-grad hooks right after it has reduce-scattered that
parameter's gradient into its shard (torch `_fsdp_collectives.foreach_reduce`), i.e. as soon as the gradient is
final for this backward. The hook steps that tensor alone (`tensorwise.TensorwiseOptimizer.step_tensor`) and drops
the gradient, so the sharded gradients of the whole UNet never exist at once (bf16 SDXL: 4.8 GiB / shards saved).
The same pattern as torchtitan's `OptimizersInBackwardContainer` and kohya's `--fused_backward_pass`.

What it cannot do, refused at start (`memory_args.check_args`): global-norm clipping (every gradient is needed
before the first step), fp16 loss scaling (the same), the flat one-process layout (one gradient buffer for all).
Gradient accumulation works, without the memory gain: the hooks step only in the last micro-batch's backward;
before it the sharded gradients accumulate as usual. The gradient norm is still measured (a sum of squares per
rank, added up in the step's one all-gather). A non-finite gradient cannot be skipped after the fact: the loss is
still checked, and --max_nonfinite_steps still stops the run.
"""

from __future__ import annotations

import torch

from sdxl_trainer.training.optimizers import LocalShardOptimizer, _local
from sdxl_trainer.training.tensorwise import TensorwiseOptimizer


class GradientReleaseOptimizer(LocalShardOptimizer):
    steps_in_backward = True

    def __init__(self, params: list[torch.nn.Parameter], name: str, inner_factory):
        super().__init__(params, name, inner_factory)
        if not isinstance(self.inner, TensorwiseOptimizer):
            raise TypeError("the step in backward needs a tensorwise inner optimizer (tensorwise.factory)")
        self.armed = False
        self.grad_sq: torch.Tensor | None = None  # this rank's sum of squared gradient elements, this step
        self._index = {id(p): i for i, (p, _) in enumerate(self.pairs)}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def arm(self, last_micro_batch: bool) -> None:
        """Before each micro-batch's backward: step in this backward only if it is the optimizer step's last."""
        self.armed = last_micro_batch

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
            sq = torch.linalg.vector_norm(loc.grad, dtype=torch.float64).square()
            self.grad_sq = sq if self.grad_sq is None else self.grad_sq + sq
            self.inner.step_tensor(i)
            loc.grad = None
        p.grad = None  # released: the point of stepping here

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
