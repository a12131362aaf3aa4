"""Diffusion math: noise, timesteps, posterior samples, noising, targets, loss, SDXL time ids (B1)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from sdxl_trainer.training import loss, objective, timesteps


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_noise_and_timesteps_are_reproducible_from_the_generator():
    a = objective.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(3))
    b = objective.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(3))
    c = objective.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and abs(a.mean().item()) < 0.2 and abs(a.std().item() - 1) < 0.2


def test_timesteps_are_uniform_integers_over_the_whole_range():
    sampler = timesteps.TimestepSampler(timesteps.TimestepOptions(), 1000)  # the trainer's default: uniform
    g = torch.Generator().manual_seed(0)
    t = torch.stack([sampler.sample(g) for _ in range(20000)])
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 100, minlength=10).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1  # ten bands of 100 timesteps, about equally often


def test_latents_are_a_fresh_posterior_sample_mean_plus_std_times_noise():
    mean = torch.randn(4, 3, 5).half()
    std = torch.rand(4, 3, 5).half()
    got = objective.sample_latents(mean, std, torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, mean.float() + std.float() * eps)


def test_add_noise_follows_the_schedulers_alphas(scheduler):
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    got = objective.add_noise(scheduler, x0, noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(got, a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_targets_follow_the_prediction_type(scheduler):
    x0, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 900])
    assert torch.equal(objective.training_target(scheduler, x0, noise, t), noise)
    v_sched = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    a = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(objective.training_target(v_sched, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    s_sched = DDPMScheduler.from_config(scheduler.config, prediction_type="sample")
    assert torch.equal(objective.training_target(s_sched, x0, noise, t), x0)
    s_sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        objective.training_target(s_sched, x0, noise, t)


def test_mse_is_computed_in_fp32_even_for_low_precision_predictions():
    pred = torch.randn(2, 4, 3, 3).bfloat16()
    target = torch.randn(2, 4, 3, 3)
    per = loss.per_sample_loss(pred, target, torch.tensor([10, 500]), DDPMScheduler())  # l2, no weighting
    assert per.shape == (2,) and per.dtype == torch.float32
    torch.testing.assert_close(per.mean(), ((pred.float() - target) ** 2).mean())


def test_time_ids_are_one_row_per_sample_in_sdxl_order():
    original = torch.tensor([[1681, 1100], [600, 400], [1024, 1024]])
    crop = torch.tensor([[3, 5], [0, 0], [64, 32]])
    target = torch.tensor([[1216, 832], [1024, 1024], [896, 1152]])
    ids = objective.compute_time_ids(original, crop, target)
    assert ids.shape == (3, 6) and ids.dtype == torch.int64
    assert ids.tolist() == [
        [1681, 1100, 3, 5, 1216, 832],
        [600, 400, 0, 0, 1024, 1024],
        [1024, 1024, 64, 32, 896, 1152],
    ]
    # bf16 would round 1681 to 1680 before the UNet's embedding: int64 keeps it exact.
    assert torch.tensor(1681.0).bfloat16().item() != 1681.0


def test_each_sample_is_conditioned_on_its_own_time_ids_inside_the_unet(tiny_model_dir):
    """A batch of 2 gives each sample the output it gets alone: the micro-conditioning is not mixed (B1).
    The original's field-major layout gives different outputs, so the check can fail."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet").eval()
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    pooled = torch.randn(2, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim)
    ids = objective.compute_time_ids(
        torch.tensor([[1681, 1100], [300, 900]]), torch.tensor([[3, 5], [40, 0]]), torch.tensor([[64, 64], [64, 64]])
    )
    t = torch.tensor([10, 700])

    def run(sl, time_ids):
        cond = {"text_embeds": pooled[sl], "time_ids": time_ids}
        return unet(x[sl], t[sl], encoder_hidden_states=ctx[sl], added_cond_kwargs=cond).sample

    with torch.no_grad():
        both = run(slice(0, 2), ids)
        alone = torch.cat([run(slice(0, 1), ids[0:1]), run(slice(1, 2), ids[1:2])])
        field_major = ids.t().reshape(2, 6)  # what concatenating collated fields did
        scrambled = run(slice(0, 2), field_major)
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scrambled, alone, rtol=1e-4, atol=1e-5)
