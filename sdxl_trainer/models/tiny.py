"""Build a tiny random-weight SDXL-shaped diffusers pipeline, offline and deterministic.

It is the project's embedded default: the whole chain (cache -> train -> samples -> metrics -> save ->
convert) runs on it with no network and no GPU. It learns nothing meaningful; never judge image quality
with it.

    python -m sdxl_trainer.models.tiny --output models/tiny-sdxl [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
from pathlib import Path

from sdxl_trainer.atomic_files import give_umask_mode_tree

# Number of real CLIP BPE merges kept in the tiny tokenizer: enough that ordinary English words are a
# few tokens (so "longer than 77 tokens" means a long caption, as with SDXL), small enough to stay tiny.
TINY_BPE_MERGES = 2000

# Dimensions. The comments give the SDXL base values that the same rule produces.
TE1_HIDDEN = 32  # SDXL: 768
TE2_HIDDEN = 48  # SDXL: 1280
TE2_PROJECTION = 40  # SDXL: 1280
ADDITION_TIME_EMBED_DIM = 8  # SDXL: 256


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (the GPT-2 scheme)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes], strict=True))


def _clip_bpe_merges(limit: int) -> list[str]:
    """The first `limit` merges of CLIP's BPE, read from the file open_clip ships (no import, no network)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        return []
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return [m for m in lines[1 : 1 + limit] if m.strip()]


def write_clip_tokenizer_files(directory: Path, merges: list[str]) -> int:
    """Write vocab.json and merges.txt in CLIP's layout; returns the vocabulary size."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    unique = list(dict.fromkeys(vocab))
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(unique)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    return len(unique)


def build_tiny_sdxl_pipeline(seed: int = 0, work_dir: Path | None = None):
    """Return a StableDiffusionXLPipeline with tiny random weights, identical for identical seeds."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tok_dir = Path(tmp)
        write_clip_tokenizer_files(tok_dir, _clip_bpe_merges(TINY_BPE_MERGES))
        tokenizer = CLIPTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"))
        tokenizer_2 = CLIPTokenizer(
            vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"), pad_token="!"
        )
    tokenizer.model_max_length = tokenizer_2.model_max_length = 77

    te_kwargs = dict(
        vocab_size=len(tokenizer),
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_kwargs, hidden_size=TE1_HIDDEN, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**te_kwargs, hidden_size=TE2_HIDDEN, hidden_act="gelu", projection_dim=TE2_PROJECTION)
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        # SDXL's rules: context = both encoders' hidden states side by side; the added embedding takes
        # text_encoder_2's projected pooled output plus six time ids of addition_time_embed_dim each.
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TE2_PROJECTION + 6 * ADDITION_TIME_EMBED_DIM,
        norm_num_groups=8,
    )
    # Four levels give the 8x spatial factor of SDXL's VAE.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=False,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def save_tiny_sdxl_pipeline(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny pipeline as a diffusers folder (atomically: a temporary folder renamed into place)."""
    import shutil
    import tempfile

    output = Path(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_sdxl_pipeline(seed)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-sdxl-", dir=output.parent))
    try:
        pipe.save_pretrained(tmp)
        give_umask_mode_tree(tmp)  # mkdtemp makes 0700, save_pretrained 0600 files
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the diffusers pipeline into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = save_tiny_sdxl_pipeline(args.output, args.seed)
    print(f"wrote tiny random-weight SDXL pipeline to {path}")


if __name__ == "__main__":
    main()
