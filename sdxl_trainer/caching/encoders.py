"""The models of the caching step: the VAE and both text encoders, loaded only when needed (which cached tensors
they invalidate: `caching.fingerprint`).
"""

from __future__ import annotations

import contextlib
import os

import torch

from sdxl_trainer.caching.caching_args import CachingArgs
from sdxl_trainer.models import loading

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "no": torch.float32}


class Encoders:
    """VAE and text encoders on one device, each loaded on first use (a run with nothing to do loads none)."""

    def __init__(self, args: CachingArgs, device: torch.device):
        self.args, self.device = args, device
        self.store_dtype = _DTYPES[args.cache_dtype]
        self._vae = None
        self._text = None

    def _autocast(self):
        if self.device.type != "cuda" or self.args.mixed_precision == "no":
            return contextlib.nullcontext()  # CPU: plain fp32 (exact, and fp16 CPU kernels are slow)
        return torch.autocast("cuda", dtype=_DTYPES[self.args.mixed_precision])

    @property
    def vae(self):
        if self._vae is None:
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # few distinct bucket shapes: tuned kernels pay off
            vae = loading.load_vae(self.args.pretrained_model_name_or_path, self.args.vae)
            self._vae = vae.to(self.device).eval().requires_grad_(False)
        return self._vae

    @property
    def text(self) -> loading.TextEncoders:
        if self._text is None:
            text = loading.load_text_encoders(self.args.pretrained_model_name_or_path)
            for encoder in (text.text_encoder, text.text_encoder_2):
                encoder.to(self.device).eval().requires_grad_(False)
            self._text = text
        return self._text

    @torch.inference_mode()
    def encode_images(self, pixels_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, 3) uint8 -> (latent_mean, latent_std), each (B, C, H/8, W/8), scaled like SDXL latents,
        in the cache dtype, on the encoders' device (kernels queued, not waited for). The pixels stay
        channels-last on the host (stacking them is a plain copy); the device reorders them."""
        vae = self.vae
        x = pixels_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().contiguous()
        x = x.div_(127.5).sub_(1.0)
        with self._autocast():
            posterior = vae.encode(x).latent_dist
        scale = float(vae.config.scaling_factor)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        mean = (posterior.mean.float() - shift) * scale
        std = posterior.std.float() * scale
        return mean.to(self.store_dtype), std.to(self.store_dtype)  # on the device: the caller copies them back

    @torch.inference_mode()
    def encode_texts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """SDXL's conditioning: both encoders' penultimate hidden states side by side (B, 77, D1+D2), the
        second encoder's projected pooled output (B, D_pool), and each caption's token count (for reports)."""
        text = self.text
        hidden, pooled, lengths = [], None, []
        for tokenizer, encoder in ((text.tokenizer, text.text_encoder), (text.tokenizer_2, text.text_encoder_2)):
            max_length = tokenizer.model_max_length
            tokens = tokenizer(
                captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            )
            if not lengths:
                lengths = [len(ids) for ids in tokenizer(captions, truncation=False).input_ids]
            ids = tokens.input_ids
            if self.device.type == "cuda":
                # A blocking copy from pageable memory waits for every kernel queued before it (the batch's
                # VAE encode): measured on the H200 as the caching loop's main stall.
                ids = ids.pin_memory().to(self.device, non_blocking=True)
            with self._autocast():
                out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds.float()
        prompt = torch.cat(hidden, dim=-1)
        return prompt.to(self.store_dtype), pooled.to(self.store_dtype), lengths


def resolve_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
