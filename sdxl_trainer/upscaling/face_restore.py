"""GFPGAN face restoration without facexlib: OpenCV Haar detection, eye-based alignment, feathered paste-back.

GFPGAN (v1.3/v1.4, the GFPGANv1Clean net loaded through spandrel) only restores a 512x512 face aligned like
FFHQ. facexlib, GFPGAN's own helper, downloads its detector at run time and needs basicsr, so this module
does the detection and alignment itself with what ships inside the opencv-python-headless wheel:

1. Faces are found on the *source* image with the frontal-face Haar cascade (frontal faces only: profiles
   and strongly tilted faces are missed), eyes inside each face with the eye cascade.
2. A similarity transform (rotation, uniform scale, shift) puts the two eye centres where FFHQ's 512 px
   template has them. When the eye cascade does not find a plausible pair, the eyes are estimated from the
   face box (no rotation). There is no 5-point landmark alignment (nose, mouth corners).
3. The aligned source crop goes through GFPGAN; the restored face is warped back onto the *upscaled* image
   (so ESRGAN never runs twice) and blended in with a feathered square mask (no face parsing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdxl_trainer.upscaling.model_files import UpscalerError, load_image_model

logger = logging.getLogger(__name__)

FACE_CROP_PX = 512
# Eye centres (x, y) of FFHQ's 512 px alignment template, as used by GFPGAN/facexlib: image-left eye first.
TEMPLATE_EYES_512 = ((192.98138, 239.94708), (318.90277, 240.1936))
# Where the Haar frontal-face box has the eyes, as fractions of its width/height (typical for that cascade).
BOX_EYES_FRACTIONS = ((0.34, 0.40), (0.66, 0.40))
DETECTION_MAX_SIDE_PX = 1024  # larger sources are shrunk for detection only (speed), boxes scaled back


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # (left, top, width, height) in source pixels
    eyes: tuple[tuple[float, float], tuple[float, float]]  # image-left eye first, source pixels
    eyes_detected: bool  # False: estimated from the box


# --------------------------------------------------------------------------------------------------
# Pure geometry
# --------------------------------------------------------------------------------------------------


def similarity_from_two_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) that maps src[0]->dst[0] and src[1]->dst[1].

    As complex numbers z' = a*z + b with a = (d1-d0)/(s1-s0): two point pairs fix it exactly."""
    s0, s1 = complex(*src[0]), complex(*src[1])
    d0, d1 = complex(*dst[0]), complex(*dst[1])
    if s0 == s1:
        raise ValueError("the two source points coincide")
    a = (d1 - d0) / (s1 - s0)
    b = d0 - a * s0
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]], dtype=np.float64)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 affine ``outer ∘ inner``."""
    o = np.vstack([outer, [0.0, 0.0, 1.0]])
    i = np.vstack([inner, [0.0, 0.0, 1.0]])
    return (o @ i)[:2]


def invert(affine: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([affine, [0.0, 0.0, 1.0]]))[:2]


def resize_affine(src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> np.ndarray:
    """Maps source pixel centres to resized-image pixel centres (the convention of PIL's and OpenCV's resize)."""
    sx, sy = dst_wh[0] / src_wh[0], dst_wh[1] / src_wh[1]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


def feather_mask(size_px: int, feather_px: float) -> np.ndarray:
    """(size, size) float32: 1 inside, rising smoothly from 0 at the border over ``feather_px`` pixels."""
    ramp = (np.arange(size_px, dtype=np.float32) + 0.5) / max(feather_px, 1e-6)
    edge = np.clip(np.minimum(ramp, ramp[::-1]), 0.0, 1.0)
    edge = edge * edge * (3.0 - 2.0 * edge)  # smoothstep: no visible kink where the ramp starts
    return np.minimum(edge[:, None], edge[None, :])


def eyes_from_box(box: tuple[float, float, float, float]) -> tuple[tuple[float, float], tuple[float, float]]:
    left, top, width, height = box
    (lx, ly), (rx, ry) = BOX_EYES_FRACTIONS
    return (left + lx * width, top + ly * height), (left + rx * width, top + ry * height)


def pick_eye_pair(
    eye_boxes: list[tuple[float, float, float, float]], face_box: tuple[float, float, float, float]
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The plausible eye pair among eye-cascade boxes (face coordinates), or None.

    Plausible: one centre in each half of the face, level within a quarter of the face width, and 25-65% of
    the face width apart. Among several, the pair with the largest boxes."""
    left, top, width, _ = face_box
    centres = [((x + w / 2) + left, (y + h / 2) + top, w * h) for x, y, w, h in eye_boxes]
    best = None
    for lx, ly, la in centres:
        for rx, ry, ra in centres:
            if not (lx < left + width / 2 <= rx):
                continue
            if abs(ly - ry) > 0.25 * width or not (0.25 * width <= rx - lx <= 0.65 * width):
                continue
            if best is None or la + ra > best[0]:
                best = (la + ra, (lx, ly), (rx, ry))
    return None if best is None else (best[1], best[2])


# --------------------------------------------------------------------------------------------------
# The restorer
# --------------------------------------------------------------------------------------------------


class FaceRestorer:
    """GFPGAN weights (spandrel id ``GFPGAN``) plus OpenCV's Haar cascades; fp32 (GFPGAN has no fp16 support)."""

    detector_name = "opencv-haar-frontalface_default+eye-v1"

    def __init__(
        self, model_path: str, device: torch.device, *, flag: str = "--face_restore_model", min_face_px: int = 32
    ) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise UpscalerError(f"{flag} needs opencv-python-headless (pip install -r requirements.txt)") from exc
        self.cv2 = cv2
        self.model_path = str(model_path)
        self.device = device
        self.min_face_px = min_face_px
        self.model = load_image_model(model_path, flag, device, half=False)  # GFPGAN has no fp16 support
        if self.model.architecture.id != "GFPGAN":
            raise UpscalerError(
                f"{flag}: {model_path!r} is a {self.model.architecture.name} model; expected GFPGAN v1.3/v1.4 "
                "weights (GFPGANv1.3.pth / GFPGANv1.4.pth)"
            )
        self.face_cascade = self._cascade("haarcascade_frontalface_default.xml", flag)
        self.eye_cascade = self._cascade("haarcascade_eye.xml", flag)

    def _cascade(self, name: str, flag: str):
        cascade = self.cv2.CascadeClassifier(self.cv2.data.haarcascades + name)
        if cascade.empty():
            raise UpscalerError(f"{flag}: OpenCV's {name} is missing from the cv2 package (opencv 4.x ships it)")
        return cascade

    def detect_faces(self, source: np.ndarray) -> list[Face]:
        """Frontal faces in an (H, W, 3) uint8 RGB array, with their eye centres."""
        cv2 = self.cv2
        grey = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)
        shrink = min(1.0, DETECTION_MAX_SIDE_PX / max(grey.shape))
        if shrink < 1.0:
            grey = cv2.resize(grey, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        min_px = max(int(round(self.min_face_px * shrink)), 20)
        boxes = self.face_cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_px, min_px))
        faces = []
        for x, y, w, h in np.asarray(boxes).reshape(-1, 4).tolist():
            upper = grey[y : y + int(h * 0.6), x : x + w]
            eye_min = max(w // 10, 5)
            found = self.eye_cascade.detectMultiScale(
                upper, scaleFactor=1.1, minNeighbors=3, minSize=(eye_min, eye_min)
            )
            pair = pick_eye_pair(np.asarray(found).reshape(-1, 4).tolist(), (x, y, w, h))
            eyes = pair if pair is not None else eyes_from_box((x, y, w, h))
            faces.append(
                Face(
                    box=tuple(v / shrink for v in (x, y, w, h)),
                    eyes=tuple((ex / shrink, ey / shrink) for ex, ey in eyes),
                    eyes_detected=pair is not None,
                )
            )
        return faces

    @torch.inference_mode()
    def restore(self, crops: np.ndarray) -> np.ndarray:
        """(N, 512, 512, 3) uint8 aligned faces -> restored faces, same shape. GFPGAN works in [-1, 1]; the stored
        noise buffers are used (``randomize_noise=False``) so the same image always gives the same pixels."""
        x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)
        y = self.model.model(x, return_rgb=False, randomize_noise=False)[0]
        y = y.float().add_(1.0).mul_(127.5).clamp_(0, 255).round_().to(torch.uint8)
        return y.permute(0, 2, 3, 1).cpu().numpy()

    def restore_faces(self, source: Image.Image, upscaled: Image.Image) -> tuple[Image.Image, int]:
        """Detect faces on ``source``, restore them, paste them into ``upscaled`` (the same picture, larger).

        Returns the new image and the number of faces restored."""
        cv2 = self.cv2
        src = np.asarray(source.convert("RGB"))
        faces = self.detect_faces(src)
        if not faces:
            return upscaled, 0
        to_output = resize_affine((src.shape[1], src.shape[0]), upscaled.size)
        out = np.asarray(upscaled.convert("RGB")).astype(np.float32)
        source_to_crops = [similarity_from_two_points(np.array(f.eyes), np.array(TEMPLATE_EYES_512)) for f in faces]
        crops = np.stack(
            [
                cv2.warpAffine(
                    src, m, (FACE_CROP_PX, FACE_CROP_PX), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101
                )
                for m in source_to_crops
            ]
        )
        restored = np.concatenate([self.restore(crops[i : i + 4]) for i in range(0, len(crops), 4)])
        for face, source_to_crop in zip(restored, source_to_crops, strict=True):
            output_to_crop = compose(source_to_crop, invert(to_output))
            paste_face(out, face, output_to_crop, cv2)
        logger.debug("restored %d face(s)", len(faces))
        return Image.fromarray(out.round().clip(0, 255).astype(np.uint8)), len(faces)


def paste_face(out: np.ndarray, face: np.ndarray, output_to_crop: np.ndarray, cv2) -> None:
    """Blend a restored (S, S, 3) crop into ``out`` (float32 HxWx3, in place) through a feathered mask.

    ``output_to_crop`` maps output pixels to crop pixels. Only the face's bounding box is warped. A face that
    is smaller in the output than in the crop is first shrunk with area averaging, so it does not alias."""
    size = face.shape[0]
    px_per_crop_px = 1.0 / np.sqrt(abs(np.linalg.det(output_to_crop[:, :2])))
    if px_per_crop_px < 1.0:
        small = max(int(round(size * px_per_crop_px)), 8)
        face = cv2.resize(face, (small, small), interpolation=cv2.INTER_AREA)
        output_to_crop = compose(resize_affine((size, size), (small, small)), output_to_crop)
        size = small
    mask = feather_mask(size, feather_px=0.1 * size)
    crop_to_output = invert(output_to_crop)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) - [0.5, 0.5, 0]
    xy = corners @ crop_to_output.T
    height, width = out.shape[:2]
    x0, y0 = max(int(np.floor(xy[:, 0].min())), 0), max(int(np.floor(xy[:, 1].min())), 0)
    x1, y1 = min(int(np.ceil(xy[:, 0].max())) + 1, width), min(int(np.ceil(xy[:, 1].max())) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return
    roi_to_crop = output_to_crop.copy()
    roi_to_crop[:, 2] += output_to_crop[:, :2] @ np.array([x0, y0], dtype=np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    roi_wh = (x1 - x0, y1 - y0)
    face_roi = cv2.warpAffine(face, roi_to_crop, roi_wh, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    mask_roi = cv2.warpAffine(mask, roi_to_crop, roi_wh, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    region = out[y0:y1, x0:x1]
    region += mask_roi[:, :, None] * (face_roi.astype(np.float32) - region)
