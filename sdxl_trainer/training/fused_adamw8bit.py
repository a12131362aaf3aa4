"""8-bit AdamW over bf16 weights in one compiled kernel per chunk (`--adamw_kernel fused` with `--optimizer adamw8bit`
and `--master_weights bf16_stochastic` on the flat layout): torchao's AdamW step with 8-bit moments and stochastic
rounding, driven by this project's learning-rate schedule and checkpoints.

Why: the lean plan's step (`tensorwise.py` over bitsandbytes) copies each 2**25-element chunk of bf16 weights and
gradients to fp32, runs bitsandbytes' 8-bit kernel on the copies and rounds the result back in four more passes:
about 120 ms of an ~870 ms step at batch 8 on an H200 (README, Memory), of which the 8-bit kernel is 72 ms.
torchao's `single_param_adam` reads the bf16 weight and gradient and the 8-bit moments once and writes them once,
rounding stochastically on the way out, when `torch.compile` fuses it (on CUDA; eager elsewhere, for the tests).
We call that function rather than torchao's `AdamW8bit` because its optimizer wants a tensor learning rate (the
schedule sets floats), compiles from inside `step()` and keeps its moments as tensor subclasses, which the
safetensors checkpoint stores here as their plain codes and scales.

State per chunk: 8-bit signed first and unsigned second moments in blocks of 256 (torchao's dynamic maps, as
bitsandbytes'), or fp32 moments where the chunk holds the small tensors (under 4,096 elements, as bitsandbytes
decides) or its length is not a multiple of the block. torchao's rounding draws from the global RNG; during the
step that RNG is set to the rounding stream of `stochastic_rounding.py` and the stream takes back its new state
after, so the global RNG stays untouched (data loading and the rest draw what they drew before) and the rounding
stream, saved in each checkpoint, makes a resume exact. The state differs from bitsandbytes': a resume must keep
the kernel (`NAME_SUFFIX`).
"""

from __future__ import annotations

import contextlib

import torch

from sdxl_trainer.training import compiling
from sdxl_trainer.training.optimizers import eight_bit_state

BLOCK = 256
NAME_SUFFIX = "+fused"  # the optimizer's name in checkpoints: state saved by one kernel is refused by the other


def _update():
    from torchao.optim.adam import single_param_adam

    return single_param_adam


class FusedAdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit moments over bf16 tensors (the flat layout's chunks), each updated in place."""

    def __init__(self, tensors: list[torch.Tensor], numels: list[int], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, generator: torch.Generator | None = None):  # fmt: skip
        bad = [t.dtype for t in tensors if t.dtype != torch.bfloat16]
        if bad:
            raise TypeError(f"the fused 8-bit AdamW steps bf16 weights, got {bad[0]}")
        super().__init__(tensors, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.tensors = tensors
        self.generator = generator
        self.eight_bit = [eight_bit_state(n) and t.numel() % BLOCK == 0 for t, n in zip(tensors, numels, strict=True)]
        self._compiled = None

    def _moment(self, t: torch.Tensor, signed: bool, eight_bit: bool) -> torch.Tensor:
        from torchao.optim.subclass_8bit import OptimState8bit

        if eight_bit:
            return OptimState8bit.zeros(t.shape, signed, BLOCK, t.device)
        return torch.zeros(t.shape, dtype=torch.float32, device=t.device)

    def _step_function(self, device: torch.device):
        if device.type != "cuda" or not compiling.has_c_compiler():  # eager: the same update, more passes
            return _update()
        if self._compiled is None:
            # One compiled kernel per chunk shape (the flat layout has two or three): fullgraph, static shapes.
            self._compiled = torch.compile(_update(), fullgraph=True, dynamic=False)
        return self._compiled

    @torch.no_grad()
    def step(self, closure=None):
        with _global_rng_from(self.generator):
            for i in range(len(self.tensors)):
                self._update(i)

    @torch.no_grad()
    def step_tensor(self, index: int) -> None:
        """Step tensor `index` alone (the step in backward, gradient_release.py)."""
        with _global_rng_from(self.generator):
            self._update(index)

    def _update(self, index: int) -> None:
        t = self.tensors[index]
        if t.grad is None:
            return
        group = self.param_groups[0]
        lr = torch.tensor(group["lr"], dtype=torch.float32)  # a CPU scalar: no host-device copy, no recompile
        beta1, beta2 = group["betas"]
        state = self.state[t]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self._moment(t, True, self.eight_bit[index])
            state["exp_avg_sq"] = self._moment(t, False, self.eight_bit[index])
        state["step"] += 1
        self._step_function(t.device)(
            t.detach(), t.grad, state["step"], state["exp_avg"], state["exp_avg_sq"], None, lr, beta1, beta2,
            group["weight_decay"], group["eps"], True, True,
        )  # fmt: skip

    # Checkpoints hold plain tensors: an 8-bit moment as its codes and block scales.

    def state_dict(self) -> dict:
        group = self.param_groups[0]
        chunks = []
        for t in self.tensors:
            state = self.state.get(t, {})
            chunks.append({k: _plain(v) for k, v in state.items()} if state else {})
        return {"chunks": chunks, **{k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}}

    def load_state_dict(self, state: dict) -> None:
        if len(state["chunks"]) != len(self.tensors):
            raise ValueError(f"optimizer state for {len(state['chunks'])} chunks, this run has {len(self.tensors)}")
        for t, saved in zip(self.tensors, state["chunks"], strict=True):
            self.state[t] = {k: _restored(v, t.device) for k, v in saved.items()} if saved else {}
        group = self.param_groups[0]
        group.update({k: state[k] for k in ("lr", "eps", "weight_decay")})
        group["betas"] = tuple(state["betas"])


@contextlib.contextmanager
def _global_rng_from(generator: torch.Generator | None):
    """Inside: the global RNG of `generator`'s device continues `generator`'s stream; after: the global RNG is as
    before and `generator` holds the stream's new state."""
    if generator is None:
        yield
        return
    device = generator.device
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        if cuda:
            torch.cuda.set_rng_state(generator.get_state(), device)
        else:
            torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state())


def _plain(value):
    from torchao.optim.subclass_8bit import OptimState8bit

    if isinstance(value, OptimState8bit):
        return {"codes": value.codes, "scale": value.scale, "signed": value.signed}
    return value


def _restored(value, device: torch.device):
    from torchao.optim.subclass_8bit import OptimState8bit, get_qmap_signed, get_qmap_unsigned

    if isinstance(value, dict):
        qmap = torch.tensor(get_qmap_signed() if value["signed"] else get_qmap_unsigned(), device=device)
        return OptimState8bit(value["codes"].to(device), value["scale"].to(device), qmap, bool(value["signed"]))
    return value.to(device) if value.dim() else value.cpu()  # the step count stays a CPU scalar


def chosen(args) -> bool:
    """Whether this step replaces the tensorwise one (step_cost_args.check_args has refused what it cannot do)."""
    return args.adamw_kernel == "fused" and args.optimizer == "adamw8bit"


def factory(args, generator: torch.Generator | None = None):
    """`build(tensors, numels)` like `optimizers.inner_factory`'s, making a `FusedAdamW8bit` whose rounding draws from
    `generator` (`stochastic_rounding.rounding_generator`; None: the global RNG)."""

    def build(tensors: list[torch.Tensor], numels: list[int]) -> FusedAdamW8bit:
        return FusedAdamW8bit(tensors, numels, args.learning_rate, (args.adam_beta1, args.adam_beta2),
                              args.adam_epsilon, args.adam_weight_decay, generator)  # fmt: skip

    return build
