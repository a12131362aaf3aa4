"""Score math against independent scipy/numpy computations and the scorers loaded from local files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from eval_fixtures import TinyFeatures, make_hps_checkpoint, make_lpips_backbone, shared_inception_weights
from PIL import Image

from sdxl_trainer.evaluation import score_math, scorers, support


@pytest.fixture(scope="session")
def inception_weights_file(tmp_path_factory):
    return shared_inception_weights(tmp_path_factory)


def _two_sets(n1: int, n2: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim))
    return rng.normal(size=(n1, dim)) @ mix, rng.normal(loc=0.5, size=(n2, dim)) @ (mix * 1.3)


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root of S1 S2."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_sqrtm_on_full_rank_covariances():
    a, b = _two_sets(400, 300, 12)
    assert score_math.compute_fid_from_features(a, b) == pytest.approx(_scipy_fid(a, b), rel=1e-7)


def test_fid_is_exact_and_finite_when_covariances_are_singular():
    a, b = _two_sets(10, 14, 40, seed=3)  # n < dim: both covariances are singular
    value = score_math.compute_fid_from_features(a, b)
    # Independent route for PSD matrices: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), each via scipy sqrtm.
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1).real
    trace_sqrt = np.trace(scipy.linalg.sqrtm(root @ s2 @ root).real)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(expected, rel=1e-5)
    # The sample-space route (n < dim) and the feature-space route agree.
    stats = (*score_math.compute_feature_stats(a), *score_math.compute_feature_stats(b))
    assert score_math.compute_fid(*stats) == pytest.approx(value, rel=1e-6)
    assert score_math.compute_fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_fid_agrees_with_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = TinyFeatures()
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    fake = (real.float() * 0.7 + 40).to(torch.uint8)
    metric = FrechetInceptionDistance(feature=_PoolOnly(net))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.no_grad():
        ours = score_math.compute_fid_from_features(net(fake)[0].double().numpy(), net(real)[0].double().numpy())
    assert ours == pytest.approx(float(metric.compute()), rel=1e-4)


class _PoolOnly(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.num_features = net, 16

    def forward(self, x):
        return self.net(x)[0]


def test_fid_warns_when_there_are_not_more_images_than_feature_dims():
    assert "biased" in score_math.fid_sample_size_warning(100, 5000, 2048)
    assert score_math.fid_sample_size_warning(3000, 2100, 2048) is None


def _loop_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_an_explicit_pairwise_loop_and_uses_subsets():
    a, b = _two_sets(30, 30, 8, seed=1)
    # Subsets of the whole set are permutations of it: every subset gives the same unbiased value.
    mean, std = score_math.compute_kid(a, b, subsets=5, subset_size=30)
    assert mean == pytest.approx(_loop_mmd2_unbiased(a, b), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9 * abs(mean))
    # Smaller subsets: a spread appears, the mean stays close, and the same seed repeats exactly.
    mean_sub, std_sub = score_math.compute_kid(a, b, subsets=50, subset_size=10)
    assert std_sub > 0 and mean_sub == pytest.approx(mean, rel=0.5)
    assert score_math.compute_kid(a, b, subsets=50, subset_size=10) == (mean_sub, std_sub)


def test_kid_agrees_with_torchmetrics_when_each_subset_is_the_whole_set():
    from torchmetrics.image.kid import KernelInceptionDistance

    net = TinyFeatures()
    g = torch.Generator().manual_seed(2)
    real = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    fake = torch.randint(0, 200, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    metric = KernelInceptionDistance(feature=_PoolOnly(net), subsets=3, subset_size=20)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.no_grad():
        ours, _ = score_math.compute_kid(net(fake)[0].double().numpy(), net(real)[0].double().numpy(), 3, 20)
    assert ours == pytest.approx(float(metric.compute()[0]), rel=1e-4)


def _scipy_inception_score(logits: np.ndarray) -> float:
    p = scipy.special.softmax(logits, axis=1)
    marginal = p.mean(axis=0)
    return float(np.exp(scipy.special.rel_entr(p, marginal[None, :]).sum(axis=1).mean()))


def test_inception_score_matches_scipy_and_higher_means_confident_and_diverse():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 10)) * 3
    value, std = score_math.compute_inception_score(logits, splits=1)
    assert value == pytest.approx(_scipy_inception_score(logits), rel=1e-9) and std == 0.0
    # Splits: documented as a fixed-seed shuffle then equal parts; each part scored on its own.
    perm = np.random.default_rng(0).permutation(60)
    parts = [_scipy_inception_score(p) for p in np.array_split(logits[perm], 3)]
    assert score_math.compute_inception_score(logits, splits=3) == pytest.approx((np.mean(parts), np.std(parts)))
    confident_diverse = np.eye(10)[np.arange(60) % 10] * 50
    all_same_class = np.tile(np.eye(10)[0] * 50, (60, 1))
    assert score_math.compute_inception_score(confident_diverse, 1)[0] == pytest.approx(10.0, rel=1e-6)
    assert score_math.compute_inception_score(all_same_class, 1)[0] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="splits"):
        score_math.compute_inception_score(logits[:2], splits=3)


def test_inception_scorer_loads_the_real_file_layout_and_batches_mixed_sizes(inception_weights_file, tmp_path):
    scorer = scorers.InceptionScorer(inception_weights_file, batch_size=2)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, 64), dtype=torch.uint8, generator=g) for h in (64, 64, 48)]
    pool, logits = scorer.features(images)  # one batch of two 64x64, then the 48x64 alone
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    one_by_one = np.concatenate([scorer.features([im])[0] for im in images])
    np.testing.assert_allclose(pool, one_by_one, rtol=1e-4, atol=1e-12)
    bad = tmp_path / "not_inception.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(score_math.ScoreError, match="--metrics_inception_weights"):
        scorers.InceptionScorer(bad)


def test_lpips_is_zero_for_identical_images_and_receives_minus_one_to_one(tmp_path):
    scorer = scorers.LpipsScorer(make_lpips_backbone(tmp_path / "alexnet.pth"))
    assert scorer.net == "alex"
    seen = []
    scorer.model.scaling_layer.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
    a[:, 0, 0], a[:, 0, 1] = 0, 255  # the extremes must map to exactly -1 and 1
    same, different = scorer.distances([a, a], [a, b])
    assert same == pytest.approx(0.0, abs=1e-7) and different > 1e-4
    x = torch.cat(seen)
    assert x.min().item() == -1.0 and x.max().item() == 1.0


def test_lpips_backbone_file_must_be_a_torchvision_backbone(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(score_math.ScoreError, match="--metrics_lpips_backbone"):
        scorers.LpipsScorer(bad)
    with pytest.raises(score_math.ScoreError, match="--metrics_lpips_backbone"):
        scorers.LpipsScorer(tmp_path / "missing.pth")


def test_hps_scores_come_from_the_local_checkpoint(tmp_path):
    path, reference_model = make_hps_checkpoint(tmp_path, seed=0)
    scorer = scorers.HpsScorer(path, model_name="tiny-hps-test", batch_size=2)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)) for _ in range(3)]
    captions = ["a red apple", "a dog on a beach", "a castle"]
    got = scorer.scores(images, captions)
    # The same numbers from the in-memory model that was saved: the checkpoint was really loaded.
    import open_clip

    with torch.no_grad():
        pixels = torch.stack([scorer.preprocess(im) for im in images])
        tokens = open_clip.get_tokenizer("tiny-hps-test")(captions)
        expected = (
            reference_model.encode_image(pixels, normalize=True) * reference_model.encode_text(tokens, normalize=True)
        ).sum(-1)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    # The GPU build (open_clip fp16: mixed fp16/fp32 parameters) scores under autocast to the same values.
    half = scorers.HpsScorer(path, model_name="tiny-hps-test", half=True)
    assert {p.dtype for p in half.model.parameters()} == {torch.float16, torch.float32}
    np.testing.assert_allclose(half.scores(images, captions), got, atol=5e-3)
    other_path, _ = make_hps_checkpoint(tmp_path, seed=1)
    assert not np.allclose(scorers.HpsScorer(other_path, model_name="tiny-hps-test").scores(images, captions), got)


def test_missing_weights_skip_each_score_with_one_line_and_given_bad_paths_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(scorers, "default_inception_weights", lambda: None)
    plan = support.plan_scorers(score_math.METRICS, inception_weights=None, lpips_backbone=None, hps_checkpoint=None)
    assert plan.enabled == set()
    assert set(plan.skipped) == set(score_math.METRICS)
    for name, line in plan.skipped.items():
        assert "\n" not in line and line.startswith(score_math.DISPLAY_NAMES[name] + " skipped")
    assert "--metrics_inception_weights" in plan.skipped["fid"] and "--metrics_hps_checkpoint" in plan.skipped["hps"]
    with pytest.raises(score_math.ScoreError, match="--metrics_lpips_backbone"):
        support.plan_scorers(["lpips"], inception_weights=None, lpips_backbone="/no/file", hps_checkpoint=None)
    plan = support.plan_scorers(
        ["is", "fid", "lpips"],
        inception_weights=None,
        lpips_backbone=None,
        hps_checkpoint=None,
        reference_missing_reason="the data folder is gone",
        have_custom_inception=True,
    )
    assert plan.enabled == {"is"} and "data folder" in plan.skipped["fid"]


def test_metric_names_are_checked():
    assert score_math.parse_metrics("FID, is,fid") == ["fid", "is"]
    with pytest.raises(ValueError, match="--metrics: unknown score"):
        score_math.parse_metrics("fid,clip")
    assert "higher is better" in score_math.DIRECTIONS["is"] and "lower is better" in score_math.DIRECTIONS["fid"]
