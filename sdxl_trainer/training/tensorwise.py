"""One inner optimizer per tensor: for bf16 trained weights with stochastic rounding, and for the optimizer step
inside backward (each tensor stepped as soon as its gradient is final).

`TensorwiseOptimizer` is a torch Optimizer over the tensors it is given (local shards, flat chunks: what
`optimizers.LocalShardOptimizer` and `flat_master.FlatMasterOptimizer` hand their inner optimizer), so the LR
schedule drives its one param group as usual. Inside, each tensor has its own inner optimizer (bitsandbytes
AdamW8bit, torch AdamW, Adafactor: whatever `optimizers.inner_factory` builds), which reads the group's
learning rate at every step. That is what lets one tensor be stepped alone (`step_tensor`), from a
post-accumulate-grad hook.

bf16 weights (`round_to_bf16=True`): the inner optimizer steps an fp32 copy of the tensor (made for the step and
freed after it, so only one tensor's fp32 copy exists at a time), then the result is rounded stochastically back
into the bf16 weight. The optimizer state is the inner optimizer's own (8-bit moments for AdamW8bit, fp32 for
AdamW). fp32 weights: the inner optimizer steps the tensor itself.

Optimizer state in CPU RAM (`state_device`, `--offload_optimizer_state`): between steps each tensor's large state
tensors (8-bit moments and their block scales, fp32 moments) live in pinned host buffers; a tensor's step copies its
state to the GPU, steps, and copies it back, so the GPU holds one tensor's state at a time instead of all of it
(AdamW8bit on SDXL: 4.8 GiB). Copies are queued on the current stream without waiting on the host (the allocator
reuses a freed GPU block only after the copy out of it, on the same stream); the host waits once before reading
the state for a checkpoint. Written by hand because torchao's `CPUOffloadOptimizer` steps on the CPU (slow for
2.6 B parameters), and bitsandbytes' paged optimizers move state only under memory pressure, through CUDA managed
memory that PyTorch's allocator does not count, so neither the plan's estimate nor a memory cap could rely on it.
"""

from __future__ import annotations

import torch

from sdxl_trainer.training.stochastic_rounding import stochastic_round_to_bf16

_EMPTY = torch.empty(0)
# Hyper-parameters the outer group carries and every inner optimizer reads at each step: the LR schedule sets lr,
# a resume with changed flags sets the others (resume_check.apply_to_optimizer).
SYNCED = ("lr", "betas", "eps", "weight_decay")
OFFLOAD_MIN_ELEMENTS = 2**16  # smaller state (quantization maps, step counts) stays where the optimizer put it


class TensorwiseOptimizer(torch.optim.Optimizer):
    def __init__(self, tensors: list[torch.Tensor], numels: list[int], inner_factory, lr: float,
                 round_to_bf16: bool, generator: torch.Generator | None = None,
                 state_device: torch.device | None = None):  # fmt: skip
        super().__init__(tensors, {"lr": lr})
        self.round_to_bf16 = round_to_bf16
        self.generator = generator
        self.tensors = tensors
        self.state_device = state_device  # None: the state stays on the weights' device
        self._parked: list[dict[str, torch.Tensor]] = [{} for _ in tensors]  # host buffers per tensor, by state key
        if round_to_bf16:
            bad = [t.dtype for t in tensors if t.dtype != torch.bfloat16]
            if bad:
                raise TypeError(f"bf16 stochastic rounding needs bf16 weights, got {bad[0]}")
            # fp32 stand-ins: the inner optimizer keys its state by them; their storage lives only during a step.
            self.holders = [torch.zeros(0, dtype=torch.float32, device=t.device) for t in tensors]
        else:
            self.holders = list(tensors)
        self.inners = [inner_factory([h], [n]) for h, n in zip(self.holders, numels, strict=True)]
        if self.inners:
            first = self.inners[0].param_groups[0]
            self.param_groups[0].update({k: first[k] for k in SYNCED[1:] if k in first})

    def step_tensor(self, index: int) -> None:
        """Step tensor `index` with its current `.grad` (None: nothing to do)."""
        weight = self.tensors[index]
        if weight.grad is None:
            return
        inner, holder = self.inners[index], self.holders[index]
        outer = self.param_groups[0]
        for group in inner.param_groups:
            for key in SYNCED:
                if key in group and key in outer:
                    group[key] = outer[key]
        self._fetch_state(index)
        if not self.round_to_bf16:
            holder.grad = weight.grad
            inner.step()
        else:
            holder.data = weight.detach().float()
            holder.grad = weight.grad.float()
            inner.step()
            weight.data.copy_(stochastic_round_to_bf16(holder.data, self.generator))
            holder.grad = None
            holder.data = _EMPTY.to(holder.device)
        self._park_state(index)

    def _fetch_state(self, index: int) -> None:
        """Offloaded state of tensor `index` onto its weight's device for its step (a copy, even on one device)."""
        if self.state_device is None:
            return
        state = self.inner_state(index)
        device = self.tensors[index].device
        for key, host in self._parked[index].items():
            if state.get(key) is host:
                state[key] = host.to(device, non_blocking=True, copy=True)

    def _park_state(self, index: int) -> None:
        """The large state tensors of tensor `index` back into their host buffers (made at the first step)."""
        if self.state_device is None:
            return
        state, parked = self.inner_state(index), self._parked[index]
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.numel() < OFFLOAD_MIN_ELEMENTS or value is parked.get(key):
                continue
            host = parked.get(key)
            if host is None or host.shape != value.shape or host.dtype != value.dtype:
                pin = self.state_device.type == "cpu" and torch.cuda.is_available()
                host = parked[key] = torch.empty(value.shape, dtype=value.dtype, device=self.state_device,
                                                 pin_memory=pin)  # fmt: skip
            host.copy_(value, non_blocking=True)
            state[key] = host

    @torch.no_grad()
    def step(self, closure=None):
        for i in range(len(self.tensors)):
            self.step_tensor(i)

    def state_dict(self) -> dict:
        if self.state_device is not None and torch.cuda.is_available():
            torch.cuda.synchronize()  # the last copies into the host buffers are done before anyone reads them
        outer = self.param_groups[0]
        return {"inner": [o.state_dict() for o in self.inners], **{k: outer[k] for k in SYNCED if k in outer}}

    def load_state_dict(self, state: dict) -> None:
        if len(state["inner"]) != len(self.inners):
            raise ValueError(f"optimizer state for {len(state['inner'])} tensors, this run has {len(self.inners)}")
        for i, (o, s) in enumerate(zip(self.inners, state["inner"], strict=True)):
            h, t = self.holders[i], self.tensors[i]
            if self.round_to_bf16:
                # Inner optimizers cast loaded state to their parameter's shape, dtype and device: give the stand-in
                # its real shape while loading (one at a time: never a whole fp32 copy of the model).
                h.data = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
            o.load_state_dict(s)
            self._parked[i] = {}
            self._park_state(i)  # loaded onto the GPU: back to the host before the next tensor's state arrives
            if self.round_to_bf16:
                h.data = _EMPTY.to(h.device)
        self.param_groups[0].update({k: state[k] for k in SYNCED if k in state})

    def inner_state(self, index: int) -> dict:
        """The inner optimizer's state of tensor `index` (for tests and `optimizers.state_bits`)."""
        return self.inners[index].state.get(self.holders[index], {})


def factory(inner_factory, lr: float, round_to_bf16: bool, generator: torch.Generator | None = None,
            state_device: torch.device | None = None):  # fmt: skip
    """`build(tensors, numels)` like `optimizers.inner_factory`'s, making a `TensorwiseOptimizer`."""

    def build(tensors: list[torch.Tensor], numels: list[int]) -> TensorwiseOptimizer:
        return TensorwiseOptimizer(tensors, numels, inner_factory, lr, round_to_bf16, generator, state_device)

    return build
