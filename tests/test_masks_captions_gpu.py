"""GPU: long captions and the masked loss with a FULL-SIZE random-weight SDXL UNet in bf16: the padding mask keeps
a caption's prediction unchanged in the fused attention kernels, and the trainer (with --compile auto, i.e. the
compiled transformer blocks on one GPU) trains batches of mixed caption lengths with masks as eager does.

    pytest -m gpu tests/test_masks_captions_gpu.py -s        (about 3 minutes on one H200)
Random weights: correctness and speed only, never image quality.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import run_trainer_script

from sdxl_trainer.data.dataset import pad_prompt_embeds
from sdxl_trainer.models import shapes

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _unet(dtype=torch.bfloat16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        return UNet2DConditionModel(**shapes.UNET).to(dtype).eval()


@needs_cuda
def test_a_padded_masked_caption_predicts_as_the_caption_alone_in_bf16():
    unet = _unet()
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    context = torch.randn(1, 77, 2048, **kw)
    inputs = {
        "sample": torch.randn(1, 4, 64, 64, **kw), "timestep": torch.tensor([500], device="cuda"),
        "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, **kw),
                              "time_ids": torch.tensor([[512, 512, 0, 0, 512, 512]], device="cuda")},
    }  # fmt: skip
    padded, mask = pad_prompt_embeds([context[0].cpu(), torch.randn(231, 2048, dtype=torch.bfloat16)])
    padded, mask = padded[:1].cuda(), mask[:1].cuda()
    with torch.no_grad():
        alone = unet(encoder_hidden_states=context, **inputs).sample.float()
        masked = unet(encoder_hidden_states=padded, encoder_attention_mask=mask, **inputs).sample.float()
        unmasked = unet(encoder_hidden_states=padded, **inputs).sample.float()
    masked_err = ((masked - alone).norm() / alone.norm()).item()
    unmasked_err = ((unmasked - alone).norm() / alone.norm()).item()
    print(f"\nrelative difference to the unpadded caption: masked {masked_err:.2e}, unmasked {unmasked_err:.2e}")
    assert masked_err < 1e-2 and unmasked_err > 10 * masked_err


def _model_and_cache(tiny_model_dir: Path, tmp: Path, items: int) -> tuple[Path, Path]:
    from diffusers import UNet2DConditionModel

    from sdxl_trainer.data.cache_writer import CacheWriter

    model = tmp / "sdxl-random"
    shutil.copytree(tiny_model_dir, model)
    shutil.rmtree(model / "unet")
    torch.manual_seed(0)
    with torch.device("cuda"):
        UNet2DConditionModel(**shapes.UNET).save_pretrained(model / "unet")
    torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(0)
    writer = CacheWriter(tmp / "cache" / "ds", fingerprint={"image": {"gpu": 512}, "text": {"gpu": "mixed"}})
    writer.write_empty_embeddings(torch.zeros(77, 2048).half(), torch.zeros(1280).half())
    for n in range(items):
        tensors = {
            "latent_mean": torch.randn(4, 64, 64, generator=g).half(),
            "latent_std": (0.05 * torch.rand(4, 64, 64, generator=g)).half(),
            "prompt_embeds": torch.randn((77, 154, 231)[n % 3], 2048, generator=g).half(),
            "pooled_prompt_embeds": torch.randn(1280, generator=g).half(),
        }
        if n % 2 == 0:
            tensors["loss_mask"] = (torch.rand(1, 64, 64, generator=g) > 0.5).half()
        writer.write_item(f"img_{n:05d}.png", f"caption {n}", (512, 512), (512, 512), (0, 0), tensors)
    writer.finalize()
    return model, tmp / "cache"


@needs_cuda
def test_compiled_trainer_trains_mixed_caption_lengths_with_masks_as_eager_does(tiny_model_dir, tmp_path):
    steps, batch = 6, 4
    model, cache = _model_and_cache(tiny_model_dir, tmp_path, items=batch * steps)
    losses = {}
    for compile_choice in ("auto", "none"):
        out = tmp_path / f"run-{compile_choice}"
        argv = [
            "--pretrained_model_name_or_path", str(model), "--cached_dataset_dirs", str(cache), "--output_dir",
            str(out), "--log_dir", str(tmp_path / "tb"), "--train_batch_size", str(batch),
            "--gradient_accumulation_steps", "1", "--max_train_steps", str(steps), "--mixed_precision", "bf16",
            "--optimizer", "adamw8bit", "--learning_rate", "1e-5", "--dataloader_num_workers", "2",
            "--no-save_final_model", "--checkpointing_steps", "0", "--masked_loss", "--compile", compile_choice,
        ]  # fmt: skip
        step_records = run_trainer_script(argv, out, timeout_s=1500)
        assert len(step_records) == steps and all(r["finite"] for r in step_records)
        losses[compile_choice] = [r["loss"] for r in step_records]
    print(f"\nlosses compiled {losses['auto']}\nlosses eager    {losses['none']}")
    assert losses["auto"][0] == pytest.approx(losses["none"][0], rel=2e-2)
