"""The objective options' math against independent formulas (issue 17): SNR and min-SNR weights for epsilon and
v, debiased weights, the Huber schedule and loss, zero-terminal-SNR betas, noise offset / pyramid noise /
input perturbation statistics, the timestep samplers' distributions."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from sdxl_trainer.training import loss, noise, prediction, timesteps

T = 1000


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=T)


def _alpha_bar_by_hand() -> np.ndarray:
    """SDXL's scaled-linear schedule written out: betas linear in sqrt, alpha_bar their running product."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar(scheduler):
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    ab = _alpha_bar_by_hand()[t.numpy()]
    np.testing.assert_allclose(loss.snr(scheduler, t).numpy(), ab / (1 - ab), rtol=1e-4)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_give_the_same_loss_in_x0_epsilon_and_v(scheduler, gamma):
    """Min-SNR-gamma is defined on the x0 loss (weight min(SNR, gamma)); the epsilon and v weights must give the
    same weighted loss for the same prediction, whichever parameterization the model outputs."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([3, 40, 200, 600, 990])
    x0, eps = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(5, 4, 8, 8, generator=g)
    eps = eps.double()
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ab = torch.from_numpy(_alpha_bar_by_hand()[t.numpy()]).view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    eps_hat = (xt - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    v, v_hat = ab.sqrt() * eps - (1 - ab).sqrt() * x0, ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0_hat
    snr_t = (ab / (1 - ab)).flatten()

    def mse(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    x0_loss = torch.minimum(snr_t, torch.tensor(gamma, dtype=torch.float64)) * mse(x0_hat, x0)
    eps_loss = loss.min_snr_weights(snr_t, gamma, "epsilon") * mse(eps_hat, eps)
    v_loss = loss.min_snr_weights(snr_t, gamma, "v_prediction") * mse(v_hat, v)
    torch.testing.assert_close(eps_loss, x0_loss)
    torch.testing.assert_close(v_loss, x0_loss)
    # Per-sample loss end to end: the scheduler's SNR (diffusers) and the weights applied to the element loss.
    sched_v = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    got = loss.per_sample_loss(v_hat.float(), v.float(), t, sched_v, snr_gamma=gamma)
    torch.testing.assert_close(got.double(), x0_loss, rtol=1e-3, atol=1e-6)


def test_debiased_weights_are_inverse_sqrt_snr_capped(scheduler):
    snr_t = torch.tensor([1e-4, 0.25, 4.0, 5000.0])
    torch.testing.assert_close(
        loss.debiased_weights(snr_t, "epsilon"), torch.tensor([100.0, 2.0, 0.5, 1 / math.sqrt(1000)])
    )
    torch.testing.assert_close(loss.debiased_weights(snr_t, "v_prediction"), 1 / (snr_t.clamp(max=1000) + 1))
    t = torch.tensor([5, 500])
    pred, target = torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    got = loss.per_sample_loss(pred, target, t, scheduler, debiased_estimation=True)
    ab = _alpha_bar_by_hand()[t.numpy()]
    np.testing.assert_allclose(got.numpy(), 1 / np.sqrt(np.minimum(ab / (1 - ab), 1000)), rtol=1e-4)


def test_pseudo_huber_is_l2_for_small_errors_and_linear_for_large_ones():
    c = torch.tensor([0.1])
    small, large = torch.full((1, 3), 1e-3), torch.full((1, 3), 50.0)
    zero = torch.zeros(1, 3)
    torch.testing.assert_close(loss.element_loss(small, zero, "huber", c), small**2, rtol=1e-3, atol=0)
    # 2c(sqrt(d^2 + c^2) - c) -> 2c|d| - 2c^2 for |d| >> c; smooth L1 is the same over c.
    torch.testing.assert_close(loss.element_loss(large, zero, "huber", c), 2 * 0.1 * 50 - 2 * 0.01 + 0 * large,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    torch.testing.assert_close(
        loss.element_loss(large, zero, "smooth_l1", c), loss.element_loss(large, zero, "huber", c) / 0.1
    )
    d = torch.linspace(-3, 3, 61).view(1, -1)
    by_hand = 2 * 0.1 * (torch.sqrt(d**2 + 0.01) - 0.1)
    torch.testing.assert_close(loss.element_loss(d, torch.zeros_like(d), "huber", c), by_hand)


def test_huber_schedules(scheduler):
    t = torch.tensor([0, 500, 999])
    exp = loss.huber_threshold("exponential", 0.1, t, scheduler)
    torch.testing.assert_close(exp, torch.tensor([1.0, 0.1**0.5, 0.1**0.999]))
    const = loss.huber_threshold("constant", 0.3, t, scheduler)
    assert torch.equal(const, torch.full((3,), 0.3))
    ab = _alpha_bar_by_hand()[t.numpy()]
    sigma = np.sqrt((1 - ab) / ab)
    np.testing.assert_allclose(
        loss.huber_threshold("snr", 0.1, t, scheduler).numpy(), 0.9 / (1 + sigma) ** 2 + 0.1, rtol=1e-4
    )
    # Low noise (t=0): c near 1, almost L2; high noise: c near huber_c, robust to outliers.
    snr_c = loss.huber_threshold("snr", 0.1, t, scheduler)
    assert snr_c[0] > 0.8 and snr_c[2] < 0.11


def test_per_sample_loss_weights_elements_and_reduce_weights_samples(scheduler):
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [3.0, 3.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    t = torch.tensor([10, 10])
    torch.testing.assert_close(loss.per_sample_loss(pred, target, t, scheduler), torch.tensor([5.0, 4.0]))
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    masked = loss.per_sample_loss(pred, target, t, scheduler, element_weights=mask)
    torch.testing.assert_close(masked, torch.tensor([1.0, 4.0]))
    assert loss.reduce_loss(torch.tensor([5.0, 4.0])).item() == 4.5
    assert loss.reduce_loss(torch.tensor([5.0, 4.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == 4.5


# ----------------------------------------------------------------------------- zero terminal SNR, v-prediction


def _ztsnr_betas_by_hand() -> np.ndarray:
    """Lin et al. 2024, Algorithm 1, in float64."""
    sqrt_ab = np.sqrt(_alpha_bar_by_hand())
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def test_zero_terminal_snr_betas_follow_the_paper(scheduler):
    args = argparse.Namespace(prediction_type="v_prediction", zero_terminal_snr=True)
    sched = prediction.training_scheduler(scheduler, args)
    assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr
    betas = _ztsnr_betas_by_hand()
    # diffusers computes in fp32: alpha_bar to fp32 precision, betas (ratios of neighbours) to ~1e-3.
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), np.cumprod(1 - betas), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sched.betas.double().numpy(), betas, rtol=1e-3)
    assert sched.alphas_cumprod[-1].item() == 0.0  # terminal SNR exactly 0
    assert loss.snr(sched, torch.tensor([T - 1])).item() == 0.0
    # The first timestep's SNR is kept, and the schedule stays monotone.
    assert sched.alphas_cumprod[0].item() == pytest.approx(scheduler.alphas_cumprod[0].item(), rel=1e-6)
    assert bool((sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all())
    # v loss with min-SNR stays finite at SNR 0 (weight 0 there).
    w = loss.min_snr_weights(loss.snr(sched, torch.tensor([0, T - 1])), 5.0, "v_prediction")
    assert torch.isfinite(w).all() and w[1] == 0


def test_zero_terminal_snr_refuses_an_epsilon_target(scheduler):
    with pytest.raises(ValueError, match="--zero_terminal_snr needs a v-prediction"):
        prediction.training_scheduler(scheduler, argparse.Namespace(prediction_type=None, zero_terminal_snr=True))
    unchanged = prediction.training_scheduler(scheduler, argparse.Namespace(prediction_type=None,
                                                                            zero_terminal_snr=False))  # fmt: skip
    assert unchanged is scheduler


def test_saved_scheduler_matches_the_training_schedule():
    base = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert prediction.inference_scheduler(base, None, False) is base
    v = prediction.inference_scheduler(base, "v_prediction", True)
    assert isinstance(v, EulerDiscreteScheduler)
    assert v.config.prediction_type == "v_prediction" and v.config.rescale_betas_zero_snr
    assert v.config.timestep_spacing == "trailing"
    v.set_timesteps(10)
    assert v.timesteps[0].item() == T - 1  # trailing spacing starts sampling at the last (pure-noise) timestep
    assert prediction.guidance_rescale(True, None) == prediction.DEFAULT_GUIDANCE_RESCALE
    assert prediction.guidance_rescale(False, None) == 0.0 and prediction.guidance_rescale(True, 0.2) == 0.2


# ----------------------------------------------------------------------------- noise


def test_noise_offset_adds_a_per_channel_constant_of_the_given_strength():
    g = torch.Generator().manual_seed(1)
    h = w = 16
    means = torch.stack(
        [noise.offset_noise(torch.randn(4, h, w, generator=g), 0.5, g).mean(dim=(1, 2)) for _ in range(2000)]
    )
    # Per-channel mean: white noise contributes variance 1/(h w), the offset 0.5^2.
    assert means.var().item() == pytest.approx(1 / (h * w) + 0.25, rel=0.08)
    g = torch.Generator().manual_seed(2)
    rand = torch.stack(
        [noise.offset_noise(torch.zeros(4, 1, 1), 0.5, g, random_strength=True).flatten() for _ in range(4000)]
    )
    # Random strength s ~ U(0, 0.5): E[(s n)^2] = 0.25 / 3.
    assert rand.pow(2).mean().item() == pytest.approx(0.25 / 3, rel=0.08)


def test_pyramid_noise_has_unit_std_and_low_frequencies():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 64, 64, generator=g)
    out = noise.pyramid_noise(base, g, iterations=6, discount=0.8)
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(out.mean().item()) < 0.5

    def neighbour_correlation(x):
        return torch.corrcoef(torch.stack([x[:, :, :-1].flatten(), x[:, :, 1:].flatten()]))[0, 1].item()

    assert abs(neighbour_correlation(base)) < 0.05  # white noise: neighbours independent
    assert neighbour_correlation(out) > 0.2  # the coarse levels make neighbouring pixels correlated
    # Deterministic from the generator.
    again = noise.pyramid_noise(base, torch.Generator().manual_seed(9), 6, 0.8)
    assert torch.equal(again, noise.pyramid_noise(base, torch.Generator().manual_seed(9), 6, 0.8))


def test_input_perturbation_noises_the_input_only():
    g = torch.Generator().manual_seed(4)
    eps = torch.randn(4, 32, 32, generator=g)
    out = noise.shape_noise(eps, noise.NoiseOptions(input_perturbation=0.1), g)
    assert torch.equal(out["noise"], eps)
    assert (out["input_noise"] - eps).std().item() == pytest.approx(0.1, rel=0.05)
    # No option on: nothing drawn, the generator's stream is untouched.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert noise.shape_noise(eps, noise.NoiseOptions(), g1) == {"noise": eps}
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


# ----------------------------------------------------------------------------- timesteps


def _draw(options: timesteps.TimestepOptions, n: int = 20000) -> torch.Tensor:
    sampler = timesteps.TimestepSampler(options, T)
    g = torch.Generator().manual_seed(6)
    return torch.stack([sampler.sample(g) for _ in range(n)])


def test_default_timesteps_are_the_uniform_randint_draws():
    sampler = timesteps.TimestepSampler(timesteps.TimestepOptions(), T)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [sampler.sample(g1).item() for _ in range(5)] == torch.randint(0, T, (5,), generator=g2).tolist()


def test_window_and_logit_normal_distributions():
    draws = _draw(timesteps.TimestepOptions(min_timestep=200, max_timestep=400), 5000)
    assert draws.min().item() >= 200 and draws.max().item() <= 399 and draws.float().std().item() > 50
    # Logit-normal: compare the probability vector with a Monte-Carlo histogram of sigmoid(N(m, s)).
    opts = timesteps.TimestepOptions(sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    probs = timesteps.timestep_probabilities(opts, T)
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mc = torch.bincount((torch.sigmoid(0.5 + 0.8 * z) * T).long().clamp(max=T - 1), minlength=T).double()
    mc_bins, prob_bins = (mc / mc.sum()).view(10, 100).sum(1), probs.view(10, 100).sum(1)
    torch.testing.assert_close(prob_bins, mc_bins, atol=2e-3, rtol=0)
    drawn = torch.bincount(_draw(opts), minlength=T).double().view(10, 100).sum(1) / 20000
    torch.testing.assert_close(drawn, prob_bins, atol=0.015, rtol=0)


def test_timestep_bias_as_diffusers_defines_it():
    later = timesteps.TimestepOptions(bias_strategy="later", bias_multiplier=3.0, bias_portion=0.25)
    probs = timesteps.timestep_probabilities(later, T)
    # 250 timesteps with weight 3 against 750 with weight 1: half the mass on the last quarter.
    assert probs[750:].sum().item() == pytest.approx(0.5) and probs[0].item() == pytest.approx(1 / 1500)
    assert (_draw(later, 8000) >= 750).float().mean().item() == pytest.approx(0.5, abs=0.02)
    rng = timesteps.TimestepOptions(bias_strategy="range", bias_multiplier=0.0001, bias_begin=0, bias_end=900)
    assert (_draw(rng, 4000) >= 900).float().mean().item() > 0.98
    earlier = timesteps.TimestepOptions(bias_strategy="earlier", bias_multiplier=2.0, bias_portion=0.5)
    assert timesteps.timestep_probabilities(earlier, T)[:500].sum().item() == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--huber_c", "0"], "--huber_c"),
        (["--snr_gamma", "-1"], "--snr_gamma"),
        (["--noise_offset", "-0.1"], "--noise_offset"),
        (["--noise_offset_random_strength"], "--noise_offset_random_strength"),
        (["--multires_noise_discount", "0"], "--multires_noise_discount"),
        (["--zero_terminal_snr", "--prediction_type", "epsilon"], "--zero_terminal_snr"),
        (["--min_timestep", "500", "--max_timestep", "400"], "--max_timestep"),
        (["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "0"], "--timestep_bias_multiplier"),
        (["--timestep_bias_strategy", "range", "--timestep_bias_begin", "10", "--timestep_bias_end", "5"],
         "--timestep_bias_end"),
        (["--logit_std", "0"], "--logit_std"),
    ],
)  # fmt: skip
def test_bad_objective_flags_fail_at_start_naming_the_flag(tmp_path, capsys, extra, flag):
    from sdxl_trainer.training import train_args

    with pytest.raises(SystemExit):
        train_args.parse_args(["--cached_dataset_dirs", str(tmp_path), *extra])
    assert flag in capsys.readouterr().err
