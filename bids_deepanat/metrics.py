"""Quality of a synthesized T1w against the acquired (registered) one, inside the mask (SPEC §9).

Both images are z-scored with their own mean and standard deviation inside the mask, as the
network's target is, so the metrics compare contrast and anatomy, not arbitrary scanner units.
"""

from __future__ import annotations

import numpy as np

#: Metric names in the order they are written.
METRICS = ("mae", "mse", "mse_rescaled", "psnr", "ssim", "pearson_r")


def zscore(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(image - mean) / std over the mask; 0 outside it."""
    values = image[mask].astype(np.float64)
    std = values.std()
    out = np.zeros(image.shape, dtype=np.float64)
    out[mask] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


def ssim_3d(a: np.ndarray, b: np.ndarray, mask: np.ndarray, *, data_range: float,
            sigma_vox: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) over the mask, Gaussian 3D windows."""
    from scipy import ndimage

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(x):
        return ndimage.gaussian_filter(x, sigma_vox, truncate=3.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) *
                                                        (var_a + var_b + c2))
    return float(ssim[mask].mean())


def synthesis_metrics(synth: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MAE and MSE on z-scores, the reference's MSE after (x + 3) / 6, PSNR, SSIM, Pearson r.

    PSNR and SSIM use the (x + 3) / 6 rescaling with a data range of 1, like the reference
    evaluation, which maps z-scores in [-3, 3] to [0, 1].
    """
    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        raise ValueError("the mask is empty")
    if synth.shape != target.shape or synth.shape != mask.shape:
        raise ValueError(f"shapes differ: {synth.shape}, {target.shape}, {mask.shape}")
    zs, zt = zscore(synth, mask), zscore(target, mask)
    diff = zs[mask] - zt[mask]
    rs, rt = (zs + 3) / 6 * mask, (zt + 3) / 6 * mask
    mse_rescaled = float(np.mean((rs[mask] - rt[mask]) ** 2))
    r = np.corrcoef(zs[mask], zt[mask])[0, 1] if diff.size > 1 else np.nan
    return {
        "mae": float(np.mean(np.abs(diff))),
        "mse": float(np.mean(diff**2)),
        "mse_rescaled": mse_rescaled,
        "psnr": float(10 * np.log10(1.0 / mse_rescaled)) if mse_rescaled > 0 else float("inf"),
        "ssim": ssim_3d(rs, rt, mask, data_range=1.0),
        "pearson_r": float(r),
    }
