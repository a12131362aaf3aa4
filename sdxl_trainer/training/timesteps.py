"""Timestep sampling for training: uniform (the default), logit-normal, a [min, max) window, and a biased range
with a strength multiplier (diffusers' `--timestep_bias_*`). Drawn per item from the item's generator.

Every non-default choice is one probability vector over the discrete timesteps, sampled with
`torch.multinomial`: the window, the logit-normal density and the bias then combine by multiplication, and a
test can compare the vector with independent formulas. The default keeps `torch.randint` (the same draws as
before these options existed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLINGS = ("uniform", "logit_normal")
BIAS_STRATEGIES = ("none", "earlier", "later", "range")


@dataclass(frozen=True)
class TimestepOptions:
    sampling: str = "uniform"
    min_timestep: int = 0
    max_timestep: int | None = None  # exclusive; None: num_train_timesteps
    logit_mean: float = 0.0
    logit_std: float = 1.0
    bias_strategy: str = "none"
    bias_multiplier: float = 1.0
    bias_portion: float = 0.25
    bias_begin: int = 0
    bias_end: int = 1000

    def is_default(self, num_train_timesteps: int) -> bool:
        window = self.min_timestep == 0 and self.max_timestep in (None, num_train_timesteps)
        return self.sampling == "uniform" and window and self.bias_strategy == "none"


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def bias_weights(options: TimestepOptions, num_train_timesteps: int) -> torch.Tensor:
    """diffusers' `generate_timestep_weights` rule: 1 everywhere, `bias_multiplier` on the biased timesteps
    (the last / first `bias_portion` of them, or [bias_begin, bias_end))."""
    weights = torch.ones(num_train_timesteps, dtype=torch.float64)
    count = int(options.bias_portion * num_train_timesteps)
    if options.bias_strategy == "later":
        weights[num_train_timesteps - count :] *= options.bias_multiplier
    elif options.bias_strategy == "earlier":
        weights[:count] *= options.bias_multiplier
    elif options.bias_strategy == "range":
        weights[options.bias_begin : options.bias_end] *= options.bias_multiplier
    return weights


def timestep_probabilities(options: TimestepOptions, num_train_timesteps: int) -> torch.Tensor:
    """P(t) for t in [0, num_train_timesteps) (float64, sums to 1)."""
    low = options.min_timestep
    high = options.max_timestep if options.max_timestep is not None else num_train_timesteps
    probs = torch.zeros(num_train_timesteps, dtype=torch.float64)
    n = high - low
    if options.sampling == "logit_normal":
        # Bin k of the window holds the mass of sigmoid(N(mean, std)) in [k/n, (k+1)/n): the logit-normal of
        # SD3 (Esser et al. 2024) over the window, most mass in the middle timesteps.
        edges = torch.arange(n + 1, dtype=torch.float64) / n
        logits = torch.logit(edges)  # -inf and +inf at the ends: CDF 0 and 1
        cdf = _normal_cdf((logits - options.logit_mean) / options.logit_std)
        probs[low:high] = cdf[1:] - cdf[:-1]
    else:
        probs[low:high] = 1.0
    probs = probs * bias_weights(options, num_train_timesteps)
    total = probs.sum()
    if not total > 0:
        raise ValueError("--timestep_bias_*/--min_timestep/--max_timestep leave no timestep with probability > 0")
    return probs / total


class TimestepSampler:
    """Draws one timestep per item; holds the probability vector so each draw is one multinomial call."""

    def __init__(self, options: TimestepOptions, num_train_timesteps: int):
        self.options = options
        self.num_train_timesteps = num_train_timesteps
        self.default = options.is_default(num_train_timesteps)
        self.probs = None if self.default else timestep_probabilities(options, num_train_timesteps).float()

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """A 0-d int64 timestep."""
        if self.default:
            return torch.randint(0, self.num_train_timesteps, (1,), generator=generator)[0]
        return torch.multinomial(self.probs, 1, generator=generator)[0]
