"""The embedded default: a tiny SDXL-shaped pipeline that loads offline and follows SDXL's shape rules."""

import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_trainer.models.tiny import save_tiny_sdxl_pipeline


def test_tiny_pipeline_loads_offline_and_generates(tiny_model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    assert pipe.vae_scale_factor == 8
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    image = pipe("a red cube", num_inference_steps=2, height=64, width=96, output_type="pil").images[0]
    assert image.size == (96, 64)


def test_tiny_pipeline_is_deterministic_for_a_seed(tmp_path):
    a = StableDiffusionXLPipeline.from_pretrained(save_tiny_sdxl_pipeline(tmp_path / "a", seed=3))
    b = StableDiffusionXLPipeline.from_pretrained(save_tiny_sdxl_pipeline(tmp_path / "b", seed=3))
    c = StableDiffusionXLPipeline.from_pretrained(save_tiny_sdxl_pipeline(tmp_path / "c", seed=4))
    for name, p in a.unet.state_dict().items():
        assert torch.equal(p, b.unet.state_dict()[name])
    assert any(not torch.equal(p, c.unet.state_dict()[n]) for n, p in a.unet.state_dict().items())


def test_tiny_pipeline_is_small(tmp_path):
    path = save_tiny_sdxl_pipeline(tmp_path / "m")
    size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size_bytes < 20 * 2**20
