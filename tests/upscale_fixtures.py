"""Random-weight upscaler and face-restoration weights files in the real architectures, for tests and benches.

Nothing here downloads anything: every network is built from spandrel's own architecture classes with random
weights and saved the way the real releases are saved (``{"params_ema": state_dict}`` in a ``.pth``, or a
plain ``.safetensors``). The x4plus builder also writes the key layout of the real ``RealESRGAN_x4plus.pth``
(basicsr's ``conv_first`` / ``body.N.rdbM`` names), so the tests exercise the same detection path as a real
download.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.GFPGAN import GFPGAN

# basicsr (new) names of the non-trunk layers of a x4 RRDBNet, keyed by spandrel's old-arch sequence index.
_X4_OLD_TO_NEW = {"0": "conv_first", "3": "conv_up1", "6": "conv_up2", "8": "conv_hr", "10": "conv_last"}


def _random_init(module: torch.nn.Module, seed: int, weight_std: float | None) -> None:
    """Deterministic weights. ``weight_std`` shrinks conv weights so a deep random net stays out of saturation
    (real ESRGAN checkpoints are initialised at 0.1x kaiming for the same reason)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if weight_std is not None and param.dim() == 4:
                fan_in = param.shape[1] * param.shape[2] * param.shape[3]
                param.normal_(0.0, weight_std / fan_in**0.5, generator=generator)
            elif weight_std is not None and name.endswith("bias"):
                param.zero_()
        if weight_std is not None:
            # centre the last layer's output on mid-grey so little of it is clamped to 0 or 1
            last_bias = [p for n, p in module.named_parameters() if n.endswith("bias")][-1]
            last_bias.fill_(0.5)


def esrgan_state_dict(
    num_blocks: int = 23,
    num_filters: int = 64,
    scale: int = 4,
    seed: int = 0,
    basicsr_keys: bool = True,
    pixel_unshuffle: int | None = None,
) -> dict[str, torch.Tensor]:
    """An RRDBNet (grow channels 32, as in every released ESRGAN) with random weights.

    ``num_blocks=23, num_filters=64, scale=4`` is the RealESRGAN_x4plus shape (16.7 M parameters). With
    ``basicsr_keys`` (scale 4 only, see ``to_basicsr_keys``) the keys follow the real release; otherwise the
    old ESRGAN layout (``model.0.weight`` ...) of files such as 4x_foolhardy_Remacri.pth.
    ``pixel_unshuffle=2`` with ``scale=4`` is the RealESRGAN_x2plus trick (the input is space-to-depth folded
    first, so the net is x2 overall)."""
    in_nc = 3 * (pixel_unshuffle or 1) ** 2
    with torch.device("meta"):  # skip the constructor's own (slow, discarded) initialisation of 16.7 M weights
        net = ESRGAN(
            in_nc=in_nc,
            out_nc=3,
            num_filters=num_filters,
            num_blocks=num_blocks,
            scale=scale,
            shuffle_factor=pixel_unshuffle,
        )
    net.to_empty(device="cpu")
    assert all(p.dim() == 4 or n.endswith("bias") for n, p in net.named_parameters())  # all set below
    _random_init(net, seed, weight_std=1.0)
    old = {k: v.detach() for k, v in net.state_dict().items()}
    return to_basicsr_keys(old, num_blocks) if basicsr_keys else old


def to_basicsr_keys(old: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """Rename an old-layout x4 RRDBNet state dict to the basicsr layout of RealESRGAN_x4plus.pth."""
    new: dict[str, torch.Tensor] = {}
    for key, value in old.items():
        rdb = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key)
        trunk = re.fullmatch(rf"model\.1\.sub\.{num_blocks}\.(weight|bias)", key)
        outer = re.fullmatch(r"model\.(\d+)\.(weight|bias)", key)
        if rdb:
            new[f"body.{rdb[1]}.rdb{rdb[2]}.conv{rdb[3]}.{rdb[4]}"] = value
        elif trunk:
            new[f"conv_body.{trunk[1]}"] = value
        elif outer and outer[1] in _X4_OLD_TO_NEW:
            new[f"{_X4_OLD_TO_NEW[outer[1]]}.{outer[2]}"] = value
        else:
            raise ValueError(f"not an x4 RRDBNet key: {key} (the basicsr layout is only written for scale 4)")
    return new


def compact_state_dict(num_feat: int = 16, num_conv: int = 4, scale: int = 4, seed: int = 0) -> dict:
    """SRVGGNetCompact (realesr-general-x4v3 is num_feat=64, num_conv=32) with random weights."""
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale)
    _random_init(net, seed, weight_std=1.0)
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()}


def gfpgan_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """GFPGANv1Clean in the v1.3/v1.4 configuration (512 px, channel multiplier 2): 86 M random parameters."""
    torch.manual_seed(seed)
    net = GFPGAN(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()}


def shared_gfpgan_file(base_dir: str | Path) -> Path:
    """One random GFPGAN file per test session (pass ``tmp_path_factory.getbasetemp()``): building and saving
    the 86 M parameters takes seconds, and several test files need it."""
    path = Path(base_dir) / "shared-weights" / "GFPGANv1.4.safetensors"
    if not path.exists():
        temp = save_weights(gfpgan_state_dict(seed=4), path.with_suffix(".tmp.safetensors"))
        temp.replace(path)
    return path


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """``.pth``: ``{"params_ema": sd}`` as Real-ESRGAN/GFPGAN release it; ``.safetensors``: the plain dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save({"params_ema": state_dict}, path)
    return path


def draw_face(size_px: int = 256, background: tuple[int, int, int] = (90, 120, 150)) -> Image.Image:
    """A drawn, blurred frontal face that OpenCV's Haar frontal-face cascade detects (its eyes too from about
    256 px). Eye centres at (0.406, 0.4375) and (0.594, 0.4375) of the image size."""
    image = Image.new("RGB", (size_px, size_px), background)
    draw = ImageDraw.Draw(image)

    def box(*coords: float) -> list[float]:
        return [c * size_px / 256 for c in coords]

    draw.ellipse(box(68, 40, 188, 210), fill=(225, 185, 160))  # face
    draw.chord(box(64, 30, 192, 120), 180, 360, fill=(50, 35, 25))  # hair
    draw.rectangle(box(88, 92, 118, 98), fill=(70, 50, 40))  # brows
    draw.rectangle(box(138, 92, 168, 98), fill=(70, 50, 40))
    draw.ellipse(box(92, 106, 116, 118), fill=(40, 30, 30))  # eyes
    draw.ellipse(box(140, 106, 164, 118), fill=(40, 30, 30))
    draw.polygon([tuple(box(128, 118)), tuple(box(120, 150)), tuple(box(136, 150))], fill=(200, 150, 130))  # nose
    draw.ellipse(box(104, 162, 152, 176), fill=(150, 60, 60))  # mouth
    return image.filter(ImageFilter.GaussianBlur(2 * size_px / 256))
