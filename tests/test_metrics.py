"""Quality metrics on images with known relations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bids_deepanat.metrics import METRICS, synthesis_metrics, zscore


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    target = ndimage.gaussian_filter(rng.normal(size=(24, 24, 24)), 2)
    mask = np.zeros(target.shape, bool)
    mask[4:20, 4:20, 4:20] = True
    return target, mask, rng


def test_identical_images_are_perfect(images):
    target, mask, _ = images
    m = synthesis_metrics(target, target, mask)
    assert m["mae"] == pytest.approx(0, abs=1e-12) and m["mse"] == pytest.approx(0, abs=1e-12)
    assert m["ssim"] == pytest.approx(1.0) and m["pearson_r"] == pytest.approx(1.0)
    assert m["psnr"] == float("inf")
    assert tuple(m) == METRICS


def test_metrics_ignore_scale_and_offset(images):
    target, mask, _ = images
    m = synthesis_metrics(3 * target + 100, target, mask)
    assert m["mse"] == pytest.approx(0, abs=1e-12) and m["ssim"] == pytest.approx(1.0)


def test_known_noise_level(images):
    """z-scored images that differ by independent noise: MSE and the rescaled MSE follow."""
    target, mask, rng = images
    noisy = zscore(target, mask) + rng.normal(scale=0.5, size=target.shape)
    m = synthesis_metrics(noisy, target, mask)
    # after re-z-scoring, the difference has variance 2 - 2r
    assert m["mse"] == pytest.approx(2 - 2 * m["pearson_r"], rel=1e-6)
    assert m["mse_rescaled"] == pytest.approx(m["mse"] / 36, rel=1e-6)
    assert m["psnr"] == pytest.approx(10 * np.log10(1 / m["mse_rescaled"]))
    assert 0.5 < m["pearson_r"] < 0.99 and m["ssim"] < 0.99
    worse = synthesis_metrics(zscore(target, mask) + rng.normal(size=target.shape), target, mask)
    assert worse["ssim"] < m["ssim"] and worse["mae"] > m["mae"]


def test_bad_input(images):
    target, mask, _ = images
    with pytest.raises(ValueError, match="empty"):
        synthesis_metrics(target, target, np.zeros_like(mask))
    with pytest.raises(ValueError, match="shapes"):
        synthesis_metrics(target[:-1], target, mask)
