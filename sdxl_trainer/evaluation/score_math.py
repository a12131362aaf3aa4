"""The metrics' names and pure math: FID (Fréchet distance), KID (unbiased MMD² with a cubic kernel),
Inception Score, on numpy arrays. Tested against independent formulas; no model needed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

INCEPTION_POOL_DIM = 2048


METRICS = ("fid", "kid", "is", "lpips", "hps")


DISPLAY_NAMES = {
    "fid": "FID",
    "kid": "KID",
    "kid_std": "KID std",
    "is": "IS",
    "is_std": "IS std",
    "lpips": "LPIPS",
    "hps": "HPSv2",
}


# What a number means; shown by --help and in the printed tables. The seed's README had IS backwards.
DIRECTIONS = {
    "fid": "lower is better (distance between generated and reference Inception statistics)",
    "kid": "lower is better (unbiased kernel distance; usable on smaller sets than FID)",
    "is": "higher is better (confident and diverse ImageNet classes; about 1 = poor)",
    "lpips": "lower = closer to the reference image of the same caption (a fidelity measure, 0 = identical)",
    "hps": "higher is better (human preference for the image given its caption; compare on equal prompts)",
}


class ScoreError(RuntimeError):
    """A scorer could not be built or used; the message names the flag and the file."""


def parse_metrics(text: str | Sequence[str], flag: str = "--metrics") -> list[str]:
    """'fid,kid,is' (or a list) -> ['fid', 'kid', 'is']; unknown names raise naming the flag."""
    names = text.split(",") if isinstance(text, str) else list(text)
    chosen = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in chosen if n not in METRICS]
    if unknown:
        raise ValueError(f"{flag}: unknown score(s) {', '.join(unknown)}; choose from {','.join(METRICS)}")
    return list(dict.fromkeys(chosen))


def compute_feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of an (N, D) feature array, N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; round-off negatives are clamped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def compute_fid(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which equal those of
    the symmetric PSD matrix S1^(1/2) S2 S1^(1/2). Working with that matrix (eigh, float64, tiny negative
    round-off eigenvalues clamped to zero) is exact for singular covariances too (n <= D), where
    scipy's sqrtm of the non-symmetric product S1 S2 turns complex or inaccurate (seed defect B20).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def compute_fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID of two (N, D) feature sets, exact for any N.

    With fewer images than dimensions the D x D route costs two D^3 eigendecompositions (seconds at
    D = 2048) for matrices of rank < N. The same value comes from the N1 x N2 matrix M = A1 A2^T /
    sqrt((N1-1)(N2-1)) of the centred features A: the nonzero eigenvalues of S1 S2 = A1^T A1 A2^T A2 / c
    are those of M M^T, so tr((S1 S2)^(1/2)) is the sum of M's singular values.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    n1, n2 = x.shape[0], y.shape[0]
    if min(n1, n2) >= x.shape[1]:
        return compute_fid(*compute_feature_stats(x), *compute_feature_stats(y))
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {n1} and {n2}")
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    a1, a2 = x - mu1, y - mu2
    trace1, trace2 = (a1 * a1).sum() / (n1 - 1), (a2 * a2).sum() / (n2 - 1)
    trace_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + trace1 + trace2 - 2.0 * trace_sqrt)


def fid_sample_size_warning(n1: int, n2: int, dim: int = INCEPTION_POOL_DIM) -> str | None:
    """A one-line warning when a set is too small for a full-rank covariance of `dim` features."""
    n = min(n1, n2)
    if n > dim:
        return None
    return (
        f"FID on {n} images with {dim}-d features: the covariance has rank < {dim}, so the value is biased "
        f"high and only comparable between runs with the same number of images (use > {dim}, ideally 10k)"
    )


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def compute_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel (diagonals excluded; the seed's biased form kept them)."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def compute_kid(
    features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over random subsets.

    Each subset draws `subset_size` rows from each set without replacement (clamped to the smaller set),
    from a generator seeded with `seed`, so the same features always give the same value.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    values = [
        compute_mmd2_unbiased(
            x[rng.choice(x.shape[0], size, replace=False)], y[rng.choice(y.shape[0], size, replace=False)]
        )
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def compute_inception_score(logits: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))): mean and std over `splits` disjoint parts.

    The rows are shuffled with a fixed seed first (so parts do not follow bucket order). Higher is
    better: it grows when each image is confidently one class and the classes are diverse.
    """
    x = np.asarray(logits, np.float64)
    if splits < 1 or x.shape[0] < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {x.shape[0]}")
    x = x[np.random.default_rng(seed).permutation(x.shape[0])]
    log_p = x - x.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, splits):
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
