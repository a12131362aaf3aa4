"""Prodigy (`--optimizer prodigy`): Adam whose step size D is estimated from the run itself (Mishchenko & Defazio,
2023); `--learning_rate` multiplies that estimate (1.0 = as estimated).

Written by hand, with the same update as `prodigyopt.Prodigy` 1.1.2 (tested against it), because that library
does two things wrong for this trainer:
  * Sharded, D must come from sums over the WHOLE model: each rank's dot products and |s| sums are partial. The
    library all-reduces them only when it detects FSDP1's flattened parameters or is told `fsdp_in_use`, and then
    on a tensor it creates with `.cuda()` (so not on CPU, nor on the FSDP2 CPU offload). Under FSDP2 it detects
    nothing: every rank would adapt its own D and step its shards with another size, silently. Here the two sums
    are reduced over the group that shards the tensors (not across replicas, whose shards are equal), on the
    tensors' own device.
  * It reads both sums with `.item()` per tensor (two host waits per tensor per step, ~3,400 for SDXL under FSDP2);
    here they accumulate on the device and the host reads them once per step.
The step needs every tensor's contribution before any tensor moves, so it cannot run tensor by tensor
(`--optimizer_step_in_backward`, `--master_weights bf16_stochastic`): prodigy_args.py refuses those.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

D0 = 1e-6  # the library's initial D: rarely needs changing


class Prodigy(torch.optim.Optimizer):
    """Prodigy over plain tensors (a rank's local shards or the flat layout's chunks); `group`: the process group
    whose ranks hold the other parts of the same tensors (None or one rank: nothing to add up)."""

    def __init__(self, params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, d_coef: float = 1.0, use_bias_correction: bool = False,
                 safeguard_warmup: bool = False, group=None):  # fmt: skip
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, d=D0, d0=D0, d_max=D0,
            d_numerator=0.0, d_coef=d_coef, k=0, use_bias_correction=use_bias_correction,
            safeguard_warmup=safeguard_warmup,
        )  # fmt: skip
        super().__init__(params, defaults)
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None

    @torch.no_grad()
    def step(self, closure=None):
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = math.sqrt(beta2)  # the library's default; from the betas in force (they may change at a resume)
        k, d, d0 = first["k"], first["d"], first["d0"]
        lr = max(g["lr"] for g in self.param_groups)
        dlr = d * lr
        if first["use_bias_correction"]:
            dlr *= math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1))
        stepped = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        # Every rank reduces, even one without gradients this step, so that the ranks agree on D.
        device = self.param_groups[0]["params"][0].device
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum of g·(p0 - p), sum of |s|
        for _, p in stepped:
            state = self.state[p]
            if not state:
                state["s"] = torch.zeros_like(p)
                state["p0"] = p.detach().clone()
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            if lr == 0.0:  # a warm-up step at zero: no statistics, no move (as the library)
                continue
            grad, s = p.grad, state["s"]
            sums[0] += torch.dot(grad.flatten(), (state["p0"] - p).flatten()).double()
            state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
            s.mul_(beta3).add_(grad, alpha=(d / d0) * (d if first["safeguard_warmup"] else dlr))
            sums[1] += s.abs().sum(dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(sums, group=self.group)
        dot, d_denom = sums.tolist()  # the step's one host wait
        if lr == 0.0 or d_denom == 0.0:
            return None
        d_numerator = first["d_numerator"] * beta3 + (d / d0) * dlr * dot
        d_hat = first["d_coef"] * d_numerator / d_denom
        d = d_max = max(first["d_max"], d_hat)  # D never shrinks; its growth is unbounded (the library's default)
        for g in self.param_groups:
            g.update(d_numerator=d_numerator, d=d, d_max=d_max, k=k + 1)
        for g, p in stepped:
            state = self.state[p]
            if g["weight_decay"]:
                p.add_(p, alpha=-g["weight_decay"] * dlr)
            denom = state["exp_avg_sq"].sqrt().add_(d * g["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-dlr)
        return None
