"""Optimizers that step each rank's local shards: 8-bit AdamW under FULL_SHARD with exact, per-rank state.

bitsandbytes kernels do not accept DTensors (`optimizer_update_8bit_blockwise got mixed torch.Tensor and
DTensor`, measured on an H200 under FSDP2). FSDP2 parameters are DTensors whose local shard is an ordinary
tensor, and AdamW/Lion are elementwise: stepping every rank's local shard with its local gradient shard
is the same update as stepping the whole tensor. So `LocalShardOptimizer` keeps plain tensors that alias
the local shards (`p.to_local().detach()` shares storage, in-place updates land in the DTensor) and runs
the inner optimizer on them. Its state is local by construction and is saved per rank (checkpoint.py).

Two things depend on the shard layout and are pinned here:
  * bitsandbytes gives a tensor 32-bit state instead of 8-bit when it has fewer than `min_8bit_size`
    (4096) elements. Judged on a local shard, that choice would change with the number of processes
    (a 6000-element bias is 8-bit on 1 GPU and 32-bit on 2). We decide on the GLOBAL element count, the
    same choice an unsharded run makes, and tell bitsandbytes per tensor (`eight_bit_state`).
  * 8-bit state is quantized in blocks of 256 elements of the flattened local shard, so block boundaries
    (hence rounding) differ between 1 and N processes: tiny differences, not drift. Resume with the same
    number of processes is exact; the checkpoint refuses a different layout for the optimizer state.
Adafactor factors the second moment over the rows/columns of the LOCAL shard (rows are whole, columns are
split across ranks), an approximation that also depends on the number of processes. Prodigy is not elementwise
either: its step size comes from sums over every tensor, which training/prodigy.py adds up over the shard group.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math

import torch
from torch.distributed.tensor import DTensor

from sdxl_trainer.training import fp8

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' default threshold, applied to the global element count


def eight_bit_state(global_numel: int, min_8bit_size: int = BNB_MIN_8BIT_SIZE) -> bool:
    """Whether a parameter gets 8-bit optimizer state: by its unsharded size, as on a single GPU."""
    return global_numel >= min_8bit_size


def _local(p: torch.Tensor) -> torch.Tensor:
    # The local shard itself, not `to_local()`: that goes through an autograd function per call, and this runs
    # for every parameter and gradient at every step (~3,400 calls for SDXL), which showed up as host time
    # in a profile of the H200 run.
    return p._local_tensor if isinstance(p, DTensor) else p


class LocalShardOptimizer:
    """Runs a torch/bitsandbytes optimizer on plain tensors aliasing each parameter's local shard."""

    def __init__(self, params: list[torch.nn.Parameter], name: str, inner_factory):
        self.name = name
        self.params = [p for p in params if p.requires_grad]
        # Ranks whose shard of a small tensor is empty own nothing of it (FSDP2 pads dim 0 unevenly).
        self.pairs = [(p, _local(p).detach()) for p in self.params if _local(p).numel() > 0]
        self.locals = [loc for _, loc in self.pairs]
        self.inner = inner_factory(self.locals, [p.numel() for p, _ in self.pairs])

    @property
    def param_groups(self):
        return self.inner.param_groups

    def bind_grads(self) -> None:
        """Point every local alias's .grad at the local shard of the parameter's gradient (no copy), so
        unscaling (fp16) and the step act on the real gradient memory."""
        for p, loc in self.pairs:
            shard = _local(p)
            if loc.data_ptr() != shard.data_ptr():
                # FSDP2 may re-home a shard (lazy init at the first forward); keep the alias object, whose
                # identity keys the inner optimizer's state, and point it at the new storage.
                loc.data = shard.detach()
            loc.grad = None if p.grad is None else _local(p.grad)

    def step(self, bind: bool = True) -> None:
        """The inner step on the local shards; `bind=False` when `bind_grads()` already ran this step."""
        if bind:
            self.bind_grads()
        self.inner.step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for loc in self.locals:
            loc.grad = None

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def layout(self) -> list[list[int]]:
        """Shapes of the local shards in order: a resume must see the same layout to reuse the state."""
        return [list(loc.shape) for loc in self.locals]

    def after_backward(self) -> None:
        """Nothing to do: FSDP2 has already reduced this micro-batch's gradient into the fp32 shards."""

    # The weights: FSDP2's sharded fp32 parameters are the master weights.

    def model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return fp8.plain_weights(get_model_state_dict(model))

    def load_model_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state)

    def full_model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Collective. Rank 0 gets the full fp32 state dict on CPU; the others get an empty dict."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return fp8.plain_weights(full)


@functools.cache  # one subclass per bitsandbytes class (the step in backward builds ~1,700 inner optimizers)
def _without_per_tensor_waits(optimizer_class: type) -> type:
    """`optimizer_class` (a bitsandbytes 8-bit optimizer) whose step does not wait for the GPU after every tensor.

    Why: bitsandbytes' `step()` calls `torch.cuda.synchronize()` after each tensor's update (`utils.sync_gpu`), which
    stalls the host ~1,700 times per step under FSDP2 (one per SDXL tensor, inside backward with the step in
    backward) and 77 times on the lean flat layout (an H200 profile counted 79 device synchronizations per step).
    What the waits guard is the stream: its update kernels run on the legacy default stream, not on PyTorch's
    current one (bitsandbytes PR #2050). `_ordered_with_default_stream` orders them by events instead, without
    the host waiting. The loop is bitsandbytes' own step (0.50) without paging (never used here) and the waits."""

    class WithoutWaits(optimizer_class):
        @torch.no_grad()
        def step(self, closure=None):
            stepped = [
                (gindex, pindex, group, p)
                for gindex, group in enumerate(self.param_groups)
                for pindex, p in enumerate(group["params"])
                if p.grad is not None
            ]
            if self.is_paged or not stepped:
                return super().step(closure)
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, pindex, group, p in stepped:
                if len(self.state[p]) == 0:  # zero-filled on the current stream: before the ordering below
                    self.init_state(group, p, gindex, pindex)
            with _ordered_with_default_stream(stepped[0][3].device):
                for gindex, pindex, group, p in stepped:
                    self.update_step(group, p, gindex, pindex)
            return None

    WithoutWaits.__name__ = WithoutWaits.__qualname__ = optimizer_class.__name__
    return WithoutWaits


@contextlib.contextmanager
def _ordered_with_default_stream(device: torch.device):
    """Kernels launched inside run on the default stream (bitsandbytes' updates do, whatever the current stream):
    when the current stream is another one (FSDP2 calls the step-in-backward hooks on its reduce-scatter stream),
    they wait for the work already queued on it, and its later work waits for them. Event waits: the host never
    blocks. The caching allocator reuses a block only on the stream that allocated it, which is ordered after."""
    if device.type != "cuda":
        yield
        return
    current, default = torch.cuda.current_stream(device), torch.cuda.default_stream(device)
    if current == default:
        yield
        return
    default.wait_stream(current)
    yield
    current.wait_stream(default)


def _bnb_factory(kind: str, args: argparse.Namespace):
    def build(locals_: list[torch.Tensor], global_numels: list[int]):
        import bitsandbytes as bnb

        betas = (args.adam_beta1, args.adam_beta2)
        if kind == "adamw8bit":
            opt = _without_per_tensor_waits(bnb.optim.AdamW8bit)(
                locals_, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon, weight_decay=args.adam_weight_decay
            )
        else:
            opt = _without_per_tensor_waits(bnb.optim.Lion8bit)(
                locals_, lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay
            )
        manager = bnb.optim.GlobalOptimManager.get_instance()
        for loc, numel in zip(locals_, global_numels, strict=True):
            # Override both ways, per tensor: bitsandbytes keys overrides by id(), which a freed tensor of an
            # earlier optimizer in the same process may have used.
            config = {"min_8bit_size": 0, "optim_bits": 8} if eight_bit_state(numel) else {"optim_bits": 32}
            manager.override_config(loc, key_value_dict=config)
        return opt

    return build


def _torch_adamw_factory(args: argparse.Namespace):
    def build(locals_: list[torch.Tensor], global_numels: list[int]):
        return torch.optim.AdamW(
            locals_,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.adam_weight_decay,
            # fused: one kernel reads and writes each element once (--adamw_kernel, step_cost_args.py)
            **({"fused": True} if getattr(args, "adamw_kernel", "foreach") == "fused" else {"foreach": True}),
        )

    return build


def _adafactor_factory(args: argparse.Namespace):
    def build(locals_: list[torch.Tensor], global_numels: list[int]):
        from transformers.optimization import Adafactor

        # A fixed learning rate driven by our schedule, as SDXL fine-tuning recipes use Adafactor.
        return Adafactor(
            locals_,
            lr=args.learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=args.adam_weight_decay,
        )

    return build


def _prodigy_factory(args: argparse.Namespace, shard_group):
    def build(locals_: list[torch.Tensor], global_numels: list[int]):
        from sdxl_trainer.training.prodigy import Prodigy

        return Prodigy(
            locals_, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            weight_decay=args.adam_weight_decay, d_coef=args.prodigy_d_coef,
            use_bias_correction=args.prodigy_use_bias_correction, safeguard_warmup=args.prodigy_safeguard_warmup,
            group=shard_group,
        )  # fmt: skip

    return build


def inner_factory(args: argparse.Namespace, shard_group=None):
    """`build(tensors, numels)` for --optimizer: the optimizer over plain tensors, with per-tensor 8-/32-bit
    state decided by `numels` (the element counts an unsharded run would see). `shard_group`: the group whose ranks
    hold the other shards of the same tensors (Prodigy adds its step-size statistics up over it)."""
    factories = {
        "adamw8bit": lambda: _bnb_factory("adamw8bit", args),
        "lion8bit": lambda: _bnb_factory("lion8bit", args),
        "adamw": lambda: _torch_adamw_factory(args),
        "adafactor": lambda: _adafactor_factory(args),
        "prodigy": lambda: _prodigy_factory(args, shard_group),
    }
    if args.optimizer not in factories:
        raise ValueError(f"--optimizer: unknown {args.optimizer!r}; choose one of {sorted(factories)}")
    return factories[args.optimizer]()


def build_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> LocalShardOptimizer:
    return LocalShardOptimizer(params, args.optimizer, inner_factory(args))


def state_bits(optimizer: LocalShardOptimizer) -> list[int]:
    """8 or 32 per local tensor with state (for tests and the log)."""
    bits = []
    for loc in optimizer.locals:
        st = optimizer.inner.state.get(loc, {})
        if "state1" in st:
            bits.append(8 if st["state1"].dtype == torch.uint8 else 32)
    return bits


def clip_grad_norm_(optimizer: LocalShardOptimizer, max_norm: float, shard_group) -> torch.Tensor:
    """Clip the global gradient norm over the local gradient shards; returns the norm before clipping.

    The same result as `torch.nn.utils.clip_grad_norm_` on the DTensor gradients, without DTensor dispatch
    per tensor (about 5x less host time for SDXL's ~1700 tensors): each rank sums the squares of its shards,
    one all-reduce over the group that shards the tensors (not across replicas, whose shards are equal) adds
    them up. Call after `bind_grads()` and after unscaling.
    """
    grads = [loc.grad for loc in optimizer.locals if loc.grad is not None]
    device = optimizer.locals[0].device if optimizer.locals else torch.device("cpu")
    if grads:
        # Accumulated in fp64: an fp32 norm over one flat tensor of millions of elements (flat_master.py) is
        # off by ~5e-5 relative on CPU (measured); per-tensor norms hid that, a few large chunks do not.
        total_sq = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float64)).pow(2).sum()
    else:
        total_sq = torch.zeros((), device=device, dtype=torch.float64)
    if shard_group is not None and torch.distributed.get_world_size(shard_group) > 1:
        torch.distributed.all_reduce(total_sq, group=shard_group)
    total = total_sq.sqrt()
    if grads and math.isfinite(max_norm):
        # clamp(max=1) without a host sync: scaling by 1.0 when the norm is already small enough.
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0).float())
    return total.float()
