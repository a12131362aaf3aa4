"""The models of the caching step: the VAE and both text encoders, loaded only when needed (which cached tensors
they invalidate: `caching.fingerprint`).
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch

from sdxl_trainer.caching import text_chunks
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
            # fp32 weights whatever the loaded dtype (a single file's config folder may say float16): on a GPU
            # autocast computes in --mixed_precision, on a CPU fp16 weights meet fp32 inputs and fail (issue 16).
            self._vae = vae.to(self.device, dtype=torch.float32).eval().requires_grad_(False)
        return self._vae

    @property
    def text(self) -> loading.TextEncoders:
        if self._text is None:
            text = loading.load_text_encoders(self.args.pretrained_model_name_or_path)
            for encoder in (text.text_encoder, text.text_encoder_2):
                encoder.to(self.device, dtype=torch.float32).eval().requires_grad_(False)  # as the VAE, above
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
    def encode_texts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """SDXL's conditioning for each caption, chunked by `--max_token_length` (`caching.text_chunks`).

        Returns (prompt_embeds (B, C*77, D1+D2): both encoders' penultimate hidden states side by side, each
        caption's chunks one after the other, padded with zeros to the batch's longest (C chunks);
        pooled (B, D_pool): the second encoder's projected pooled output of the first chunk; each caption's
        token count without <BOS>/<EOS> (for reports); each caption's chunk count (its rows: chunks*77))."""
        text = self.text
        limit = text_chunks.max_chunks(self.args.max_token_length)
        pairs = ((text.tokenizer, text.text_encoder), (text.tokenizer_2, text.text_encoder_2))
        content = [tokenizer(captions, add_special_tokens=False, truncation=False).input_ids for tokenizer, _ in pairs]
        lengths = [len(ids) for ids in content[0]]
        # Both encoders' rows sit side by side, so both take the same number of chunks per caption.
        chunks = [text_chunks.chunks_needed(max(len(a), len(b)), limit) for a, b in zip(*content, strict=True)]
        hidden, pooled = [], None
        for (tokenizer, encoder), ids_per_caption in zip(pairs, content, strict=True):
            special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            rows = [
                row
                for ids, count in zip(ids_per_caption, chunks, strict=True)
                for row in text_chunks.chunk_token_ids(ids, count, *special)
            ]  # every chunk of every caption: one encoder batch
            ids = torch.tensor(rows, dtype=torch.long)
            if self.device.type == "cuda":
                # A blocking copy from pageable memory waits for every kernel queued before it (the batch's
                # VAE encode): measured on the H200 as the caching loop's main stall.
                ids = ids.pin_memory().to(self.device, non_blocking=True)
            with self._autocast():
                out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            if hasattr(out, "text_embeds"):
                first_chunk_rows = torch.tensor([0, *itertools.accumulate(chunks)][:-1], device=ids.device)
                pooled = out.text_embeds.float().index_select(0, first_chunk_rows)
        flat = torch.cat(hidden, dim=-1)  # (total chunks, 77, D)
        width = max(chunks) * text_chunks.CHUNK_TOKENS
        prompt = flat.new_zeros((len(captions), width, flat.shape[-1]))
        start = 0
        for i, count in enumerate(chunks):
            prompt[i, : count * text_chunks.CHUNK_TOKENS] = flat[start : start + count].flatten(0, 1)
            start += count
        return prompt.to(self.store_dtype), pooled.to(self.store_dtype), lengths, chunks


def resolve_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
