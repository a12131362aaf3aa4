"""The networks that make the scores' inputs (the math over them: `evaluation.score_math`).

The scorer classes wrap well-kept libraries and load their
weights only from local files given by flags (nothing is downloaded):

* Inception (FID, KID, IS): torch-fidelity's TF-ported FID Inception-v3, its standard 299-px resize,
  2048-d pool features for FID/KID and the 1008 "logits_unbiased" for IS, one forward for both.
* LPIPS: the `lpips` package (its calibrated linear layers ship in the wheel) over a torchvision
  backbone file; inputs in [-1, 1], as LPIPS expects.
* HPS v2.1: an open_clip ViT-H-14 with the HPS v2.1 checkpoint; score = cosine(image, caption).

Lower is better for FID, KID and LPIPS; higher is better for IS and HPS.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl_trainer.evaluation.score_math import INCEPTION_POOL_DIM, ScoreError
from sdxl_trainer.safe_load import safe_torch_load

INCEPTION_FILE_NAME = "weights-inception-2015-12-05-6726825d.pth"


INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE_NAME}"


HPS_URL = "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt"


LPIPS_BACKBONE_HINT = (
    "torchvision's alexnet-owt-7be5be79.pth (https://download.pytorch.org/models/alexnet-owt-7be5be79.pth), "
    "or vgg16-397923af.pth / squeezenet1_1-b8a52dc0.pth"
)


def pil_to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _batches_of_equal_size(images: Sequence[torch.Tensor], batch_size: int) -> Iterable[list[int]]:
    """Consecutive index runs of at most `batch_size` images that share one (H, W)."""
    run: list[int] = []
    for i, img in enumerate(images):
        if run and (len(run) == batch_size or images[run[0]].shape != img.shape):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


def _require_file(path: str | os.PathLike, flag: str, hint: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ScoreError(f"{flag}: {p} is not a file. Get it from {hint}")
    return p


def default_inception_weights() -> Path | None:
    """torch-fidelity's file in the torch hub cache, if the user already has it there."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE_NAME
    return hub if hub.is_file() else None


class InceptionScorer:
    """FID Inception-v3 features: (pool (N, 2048), logits_unbiased (N, 1008)) from uint8 images.

    `extractor` may replace the network (any module mapping uint8 (N, 3, H, W) to a (pool, logits) pair),
    which the tests use; otherwise the weights come from `weights_path`.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        extractor: torch.nn.Module | None = None,
        flag: str = "--metrics_inception_weights",
    ):
        self.batch_size = batch_size
        self.device = torch.device(device)
        if extractor is None:
            path = _require_file(weights_path, flag, INCEPTION_URL) if weights_path else None
            if path is None:
                raise ScoreError(f"{flag}: no Inception weights given. Get {INCEPTION_FILE_NAME} from {INCEPTION_URL}")
            extractor = _load_fidelity_inception(path, flag)
            self.identity = f"inception:{path.name}:{path.stat().st_size}"
        else:
            self.identity = f"custom:{type(extractor).__name__}"
        self.model = extractor.eval().requires_grad_(False).to(self.device)

    def to(self, device: torch.device | str) -> InceptionScorer:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def features(self, images: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Features of uint8 (3, H, W) images, in order; images of equal size are batched together."""
        pools: list[np.ndarray | None] = [None] * len(images)
        logits: list[np.ndarray | None] = [None] * len(images)
        for idx in _batches_of_equal_size(images, self.batch_size):
            batch = torch.stack([images[i] for i in idx]).to(self.device)
            pool, logit = self.model(batch)
            for j, i in enumerate(idx):
                pools[i], logits[i] = pool[j].float().cpu().numpy(), logit[j].float().cpu().numpy()
        if not images:
            return np.zeros((0, INCEPTION_POOL_DIM), np.float32), np.zeros((0, 1008), np.float32)
        return np.stack(pools), np.stack(logits)


def _load_fidelity_inception(path: Path, flag: str) -> torch.nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity unpickles the file without weights_only; read it safely here and hand it the
    # plain tensors through an in-memory buffer (never executes code from the file).
    try:
        state = safe_torch_load(path)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the flag
        raise ScoreError(f"{flag}: could not read {path} as a state dict: {exc}") from exc
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        return FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer
        )
    except Exception as exc:  # noqa: BLE001
        raise ScoreError(
            f"{flag}: {path} is not torch-fidelity's FID Inception ({INCEPTION_FILE_NAME}): {exc}"
        ) from exc


def detect_lpips_net(state: dict[str, torch.Tensor]) -> str:
    """Which torchvision backbone a state dict holds: 'alex', 'vgg' or 'squeeze'."""
    keys = set(state)
    if any(k.startswith("features.") and ".squeeze." in k for k in keys):
        return "squeeze"
    if "features.28.weight" in keys:
        return "vgg"
    if "features.10.weight" in keys:
        return "alex"
    raise ValueError("not a torchvision alexnet, vgg16 or squeezenet1_1 state dict (no features.* layers found)")


class LpipsScorer:
    """LPIPS distance between image pairs (lower = more alike), inputs scaled to [-1, 1]."""

    def __init__(
        self,
        backbone_path: str | os.PathLike,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        flag: str = "--metrics_lpips_backbone",
    ):
        import lpips

        path = _require_file(backbone_path, flag, LPIPS_BACKBONE_HINT)
        try:
            state = safe_torch_load(path)
            self.net = detect_lpips_net(state)
        except Exception as exc:  # noqa: BLE001
            raise ScoreError(f"{flag}: {path}: {exc}. Expected {LPIPS_BACKBONE_HINT}") from exc
        # pnet_rand=True: build the trunk without a download; its weights come from the file below.
        with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=self.net, pretrained=True, pnet_rand=True, verbose=False)
        trunk = {}
        for name, tensor in model.net.state_dict().items():
            # lpips splits torchvision's `features` into slices keeping the layer index: slice2.3.weight
            source = "features." + name.split(".", 1)[1]
            if source not in state or state[source].shape != tensor.shape:
                raise ScoreError(f"{flag}: {path} lacks {source} of a torchvision {self.net} backbone")
            trunk[name] = state[source]
        model.net.load_state_dict(trunk)
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def to(self, device: torch.device | str) -> LpipsScorer:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def distances(self, images: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> list[float]:
        """LPIPS of each uint8 (3, H, W) image against the reference of the same size at the same index."""
        if len(images) != len(references):
            raise ValueError(f"{len(images)} images but {len(references)} references")
        out: list[float] = [0.0] * len(images)
        for idx in _batches_of_equal_size(images, self.batch_size):
            a = torch.stack([images[i] for i in idx]).to(self.device).float() / 127.5 - 1.0
            b = torch.stack([references[i] for i in idx]).to(self.device).float() / 127.5 - 1.0
            if a.shape != b.shape:
                raise ValueError(f"LPIPS pairs must have equal sizes, got {tuple(a.shape)} and {tuple(b.shape)}")
            values = self.model(a, b, normalize=False).flatten().float().cpu().tolist()
            for j, i in enumerate(idx):
                out[i] = values[j]
        return out


class HpsScorer:
    """Human Preference Score v2.1: cosine of open_clip image and caption embeddings (higher = preferred)."""

    def __init__(
        self,
        checkpoint_path: str | os.PathLike,
        device: torch.device | str = "cpu",
        model_name: str = "ViT-H-14",
        batch_size: int = 8,
        flag: str = "--metrics_hps_checkpoint",
        half: bool | None = None,
    ):
        import open_clip  # a local checkpoint file and the BPE vocab in its wheel: no hub access

        path = _require_file(checkpoint_path, flag, HPS_URL)
        device = torch.device(device)
        # fp16 weights for GPUs (hpsv2 scores under fp16 autocast; 2 GB instead of 4 for ViT-H-14), fp32 for
        # CPUs where fp16 is slow. `half` decides when the model is built on the CPU to be moved later.
        precision = "fp16" if (device.type == "cuda" if half is None else half) else "fp32"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path), precision=precision, device=device
            )
        except Exception as exc:  # noqa: BLE001
            raise ScoreError(f"{flag}: could not load {path} into open_clip {model_name}: {exc}") from exc
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        self.batch_size = batch_size

    def to(self, device: torch.device | str) -> HpsScorer:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        # open_clip's fp16 keeps some parameters (norms, embeddings) in fp32: autocast, as hpsv2 scores.
        half = any(p.dtype == torch.float16 for p in self.model.parameters())
        out: list[float] = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start : start + self.batch_size]])
            tokens = self.tokenizer(list(captions[start : start + self.batch_size]))
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=half):
                image_f = self.model.encode_image(pixels.to(self.device), normalize=True)
                text_f = self.model.encode_text(tokens.to(self.device), normalize=True)
            out += (image_f.float() * text_f.float()).sum(dim=-1).cpu().tolist()
        return out
