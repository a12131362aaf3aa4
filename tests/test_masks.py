"""Loss masks (pure parts): reading, bucket crop to latent resolution, discovery, the weighted loss, and the
padding of captions of different lengths (it must change nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdxl_trainer.data import masks
from sdxl_trainer.data.buckets import plan_item
from sdxl_trainer.data.dataset import collate, pad_prompt_embeds
from sdxl_trainer.data.images import discover_items
from sdxl_trainer.training import loss, masked_loss_args


def test_mask_at_latent_resolution_is_the_mean_of_8x8_pixels_of_the_images_bucket_crop():
    rng = np.random.default_rng(0)
    source = rng.random((208, 256)).astype(np.float32)  # (h, w)
    plan = plan_item(256, 208, 64, 256)
    # At scale 1 the bucket is the image's rows 8..200 (a centre crop), so the expectation needs no resampling.
    assert plan.bucket_wh == (256, 192) and plan.crop_top_left == (8, 0) and plan.scale == 1.0
    latent = masks.mask_to_latent(Image.fromarray(source, mode="F"), plan)
    assert latent.shape == (1, 24, 32) and latent.dtype == torch.float32
    expected = source[8:200].reshape(24, 8, 32, 8).mean(axis=(1, 3))
    np.testing.assert_allclose(latent[0].numpy(), expected, atol=1e-6)
    # Scaled down (320x256 -> 256x204, cropped to 256x192): a half-white mask stays half-white on the same side.
    plan = plan_item(320, 256, 64, 256)
    assert plan.scale < 1 and plan.crop_top_left == (6, 0)
    half = np.zeros((256, 320), np.float32)
    half[:, :160] = 1.0
    latent = masks.mask_to_latent(Image.fromarray(half, mode="F"), plan)[0]
    assert latent.shape == (24, 32) and torch.all(latent[:, :16] == 1) and torch.all(latent[:, 16:] == 0)


def test_mask_images_become_weights_in_0_1():
    grey = Image.fromarray(np.array([[0, 51, 255]], np.uint8), mode="L")
    np.testing.assert_allclose(np.asarray(masks.mask_weights(grey)), [[0, 0.2, 1]], atol=1e-6)
    colour = Image.new("RGB", (2, 1), (255, 255, 255))
    np.testing.assert_allclose(np.asarray(masks.mask_weights(colour)), [[1, 1]], atol=1e-6)
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], np.uint16))
    assert sixteen.mode.startswith("I")
    np.testing.assert_allclose(np.asarray(masks.mask_weights(sixteen)), [[0, 0.5, 1]], atol=1e-4)
    rgba = np.full((1, 2, 4), 255, np.uint8)
    rgba[0, 1, 3] = 0  # a transparent pixel of a white mask counts as black
    np.testing.assert_allclose(np.asarray(masks.mask_weights(Image.fromarray(rgba, "RGBA"))), [[1, 0]], atol=1e-6)


def test_alpha_channel_of_images_with_and_without_transparency():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, :, 3] = 255
    alpha = masks.alpha_channel(Image.fromarray(rgba, "RGBA"))
    assert alpha is not None and np.asarray(alpha).tolist() == [[255, 255], [0, 0]]
    assert masks.alpha_channel(Image.new("LA", (2, 2), (9, 128))).getpixel((0, 0)) == 128
    palette = Image.new("P", (2, 2), 3)
    palette.info["transparency"] = 3
    assert np.asarray(masks.alpha_channel(palette)).max() == 0
    assert masks.alpha_channel(Image.new("RGB", (2, 2))) is None


def test_a_mask_of_another_size_is_refused_naming_the_file():
    with pytest.raises(ValueError, match="mask x.mask.png is 64x32, the image is 64x64"):
        masks.check_mask_size(Image.new("L", (64, 32)), (64, 64), "x.mask.png")


def test_discovery_attaches_masks_and_never_trains_on_them(tmp_path):
    for name in ("a.png", "a.mask.png", "sub/b.jpg", "sub/b.mask.png", "c.png", "lonely.MASK.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    items, skipped = discover_items(tmp_path)
    assert [i.relpath for i in items] == ["a.png", "c.png", "sub/b.jpg"]
    assert [i.mask_path and i.mask_path.name for i in items] == ["a.mask.png", None, "b.mask.png"]
    assert skipped == [("lonely.MASK.png", "mask without an image of the same stem")]


def test_per_sample_loss_weights_each_element_by_the_mask():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([10, 500])
    g = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 3, 5, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 3, 5, generator=g)
    mask = torch.rand(2, 1, 3, 5, generator=g)
    mask[0, :, :, :2] = 0
    per_sample = loss.per_sample_loss(prediction, target, timesteps, scheduler, element_weights=mask)
    # Independent formula: the weighted mean of d^2 over each sample's elements (w the same on the 4 channels).
    d2 = (prediction.detach() - target) ** 2
    expected = torch.stack([(d2[b] * mask[b, 0]).sum() / (4 * mask[b].sum()) for b in range(2)])
    torch.testing.assert_close(per_sample, expected)
    # No mask, or an all-ones mask, is the plain MSE.
    plain = loss.per_sample_loss(prediction, target, timesteps, scheduler)
    torch.testing.assert_close(plain.mean(), F.mse_loss(prediction, target))
    ones = loss.per_sample_loss(prediction, target, timesteps, scheduler, element_weights=torch.ones(2, 1, 3, 5))
    torch.testing.assert_close(ones, plain)
    # Masked-out elements get no gradient.
    per_sample.mean().backward()
    assert torch.all(prediction.grad[0, :, :, :2] == 0) and torch.all(prediction.grad[0, :, :, 2:] != 0)


def test_masked_loss_refuses_a_cache_without_masks():
    with pytest.raises(ValueError, match="--masked_loss: none of the 12 cached items has a mask"):
        masked_loss_args.check_cache_has_masks(True, 0, 12)
    masked_loss_args.check_cache_has_masks(True, 1, 12)
    masked_loss_args.check_cache_has_masks(False, 0, 12)


def test_captions_of_different_lengths_are_padded_with_an_attention_mask():
    a, b = torch.randn(77, 8), torch.randn(231, 8)
    stacked, mask = pad_prompt_embeds([a, a.clone()])
    assert stacked.shape == (2, 77, 8) and mask is None  # one length: no mask, the plain attention kernels
    padded, mask = pad_prompt_embeds([a, b])
    assert padded.shape == (2, 231, 8) and mask.dtype == torch.bool
    assert torch.equal(padded[0, :77], a) and torch.count_nonzero(padded[0, 77:]) == 0 and torch.equal(padded[1], b)
    assert mask[0].tolist() == [True] * 77 + [False] * 154 and bool(mask[1].all())
    sample = {
        "latents": torch.zeros(4, 2, 2), "original_size_hw": torch.tensor([16, 16]),
        "crop_top_left": torch.tensor([0, 0]), "target_size_hw": torch.tensor([16, 16]),
        "pooled_prompt_embeds": torch.zeros(3),
    }  # fmt: skip
    batch = collate([{**sample, "prompt_embeds": a}, {**sample, "prompt_embeds": b}])
    assert batch["prompt_embeds"].shape == (2, 231, 8) and batch["encoder_attention_mask"].shape == (2, 231)
    assert "encoder_attention_mask" not in collate([{**sample, "prompt_embeds": a}] * 2)


def test_padding_a_caption_changes_nothing_in_the_unets_prediction(tiny_model_dir):
    from sdxl_trainer.models import loading

    unet = loading.load_unet(str(tiny_model_dir)).eval()
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 77, 80, generator=g)
    conditioning = {"text_embeds": torch.randn(1, 40, generator=g), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]])}
    inputs = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([500]),
              "added_cond_kwargs": conditioning}  # fmt: skip
    padded, mask = pad_prompt_embeds([context[0], torch.randn(154, 80, generator=g)])
    with torch.no_grad():
        alone = unet(encoder_hidden_states=context, **inputs).sample
        masked = unet(encoder_hidden_states=padded[:1], encoder_attention_mask=mask[:1], **inputs).sample
        unmasked = unet(encoder_hidden_states=padded[:1], **inputs).sample
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-4)  # without the mask the zeros would be attended to
