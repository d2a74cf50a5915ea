"""Susceptibility distortion from a reversed phase-encoding pair ("PEPOLAR", SPEC §5).

EPI images are displaced along the phase-encoding (PE) axis by the off-resonance field: tissue
at voxel position ``x`` appears at ``x + d(x)`` along the PE axis, where ``d`` (in voxels) is
the field in Hz times the total readout time, signed by the PE polarity. A run acquired with
the opposite polarity sees ``-r d(x)`` (``r``: ratio of the readout times), so the two b=0
images of the pair disagree by twice the distortion, and the field that makes them agree once
unwarped is the distortion (the principle of FSL topup; here a plain least-squares fit).

Unwarping conserves signal: an image stretched by the distortion is dimmer, so the unwarped
intensity is the distorted one times the Jacobian ``1 + d'(x)`` (``d'``: derivative along PE).

Pure functions on arrays; the fit uses torch for automatic gradients. All displacements are in
voxels of the image grid, along one voxel axis, for the image given first.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger(__name__)

_AXES = {"i": 0, "j": 1, "k": 2}
#: Voxels of this size (mm) or finer are subsampled by floor(FINEST_LEVEL_MM / voxel) at the
#: finest level of the fit: the field is smooth, and finer grids only cost time.
FINEST_LEVEL_MM = 2.5
#: Iterations of the fit at each level, coarsest first.
LEVEL_ITERATIONS = (200, 150, 100)
#: Smoothness weights (gradient and curvature energy of the field, in level voxels).
MEMBRANE_WEIGHT = 1e-2
BENDING_WEIGHT = 1e-2
#: Smallest Jacobian (local stretch along PE) the fit may reach before it is penalized: the
#: distortion must not fold, or the target cannot be mapped into the distorted grid.
MIN_JACOBIAN = 0.1


@dataclass(frozen=True)
class PhaseEncoding:
    """A BIDS ``PhaseEncodingDirection`` (``i``, ``j-``, ...) and the total readout time (s)."""

    direction: str
    readout_time: float | None = None

    def __post_init__(self):
        if self.direction not in {"i", "j", "k", "i-", "j-", "k-"}:
            raise ValueError(f"not a BIDS PhaseEncodingDirection: {self.direction!r}")

    @property
    def axis(self) -> int:
        return _AXES[self.direction[0]]

    @property
    def sign(self) -> int:
        return -1 if self.direction.endswith("-") else 1

    def is_reverse_of(self, other: PhaseEncoding) -> bool:
        return self.axis == other.axis and self.sign == -other.sign


def readout_time(metadata: dict, shape: tuple[int, ...]) -> float | None:
    """``TotalReadoutTime`` (s) of a BIDS sidecar, else from ``EffectiveEchoSpacing``, else None."""
    if metadata.get("TotalReadoutTime"):
        return float(metadata["TotalReadoutTime"])
    spacing = metadata.get("EffectiveEchoSpacing")
    direction = metadata.get("PhaseEncodingDirection")
    if spacing and direction and direction[0] in _AXES:
        return float(spacing) * (int(shape[_AXES[direction[0]]]) - 1)
    return None


def readout_ratio(image: PhaseEncoding, reverse: PhaseEncoding) -> float:
    """How much larger the reverse run's displacement is than the image's (1 if unknown)."""
    if image.readout_time and reverse.readout_time:
        return reverse.readout_time / image.readout_time
    return 1.0


def fieldmap_hz(displacement: np.ndarray, pe: PhaseEncoding) -> np.ndarray | None:
    """The off-resonance field (Hz) of a displacement of the image with ``pe`` (None if the
    readout time is unknown). A positive field displaces signal in the direction of
    ``PhaseEncodingDirection`` (``j-``: towards decreasing j), by Hz x readout time voxels: the
    voxel-shift convention of SDCflows."""
    if not pe.readout_time:
        return None
    return (np.asarray(displacement, dtype=np.float32) / (pe.sign * pe.readout_time)).astype(
        np.float32
    )


# --------------------------------------------------------------------------------------------
# Resampling along the PE axis
# --------------------------------------------------------------------------------------------


def _shift(volume, displacement, axis: int):
    """``volume`` (torch, 3D) sampled at ``x + displacement(x)`` along ``axis``, linear."""
    import torch
    import torch.nn.functional as F

    shape = volume.shape
    grids = torch.meshgrid(*(torch.arange(n, dtype=volume.dtype) for n in shape), indexing="ij")
    coords = list(grids)
    coords[axis] = coords[axis] + displacement
    # grid_sample wants (x, y, z) = (last, middle, first) axis, normalized to [-1, 1].
    normed = [2.0 * c / max(n - 1, 1) - 1.0 for c, n in zip(coords, shape)]
    grid = torch.stack(normed[::-1], dim=-1)[None]
    return F.grid_sample(volume[None, None], grid, mode="bilinear", padding_mode="border",
                         align_corners=True)[0, 0]


def _jacobian(displacement, axis: int):
    import torch

    if displacement.shape[axis] < 2:
        return torch.zeros_like(displacement)
    return torch.gradient(displacement, dim=axis)[0]


def unwarp(image: np.ndarray, displacement: np.ndarray, axis: int, *,
           modulate: bool = True) -> np.ndarray:
    """The undistorted image: ``image`` sampled at ``x + d(x)`` along ``axis``, times the
    Jacobian ``1 + d'(x)`` when ``modulate`` (signal conservation; False for masks/labels)."""
    import torch

    vol = torch.as_tensor(np.asarray(image, dtype=np.float32))
    disp = torch.as_tensor(np.asarray(displacement, dtype=np.float32))
    with torch.no_grad():
        out = _shift(vol, disp, axis)
        if modulate:
            out = out * torch.clamp(1.0 + _jacobian(disp, axis), min=0.0)
    return out.numpy()


def true_positions(displacement: np.ndarray, axis: int) -> np.ndarray:
    """Voxel coordinates (3, *shape) of the tissue seen at each voxel of the distorted image.

    Inverts ``y = x + d(x)`` line by line along ``axis`` (exact for the piecewise-linear ``d``);
    the map is made non-decreasing first, so a fold, should one remain, cannot scramble order.
    Sampling an undistorted image (e.g. a registered T1w) at these positions puts it into the
    distorted grid, voxel for voxel with the EPI.
    """
    disp = np.moveaxis(np.asarray(displacement, dtype=np.float64), axis, -1)
    n = disp.shape[-1]
    x = np.arange(n, dtype=np.float64)
    forward = np.maximum.accumulate(x + disp, axis=-1).reshape(-1, n)
    inverse = np.empty_like(forward)
    for row, seen in enumerate(forward):
        inverse[row] = np.interp(x, seen, x)
    coords = np.indices(displacement.shape, dtype=np.float64)
    coords[axis] = np.moveaxis(inverse.reshape(disp.shape), -1, axis)
    return coords


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------


def _levels(voxel_mm: float) -> list[int]:
    """Subsampling factors of the fit, coarsest first (finest about :data:`FINEST_LEVEL_MM`)."""
    base = max(1, math.floor(FINEST_LEVEL_MM / max(voxel_mm, 1e-3) + 1e-6))
    return [4 * base, 2 * base, base]


def _level_image(image: np.ndarray, factor: int):
    """``image`` smoothed to about ``factor`` voxels and sampled on the level grid (torch)."""
    import torch
    import torch.nn.functional as F

    smooth = ndimage.gaussian_filter(image, factor / 2.0 if factor > 1 else 0.5, mode="nearest")
    size = [max(2, math.ceil((n - 1) / factor) + 1) if n > 1 else 1 for n in image.shape]
    vol = torch.as_tensor(smooth, dtype=torch.float32)[None, None]
    return F.interpolate(vol, size=size, mode="trilinear", align_corners=True)[0, 0]


def _resize_displacement(disp, shape, axis: int):
    """A displacement (level voxels) brought onto a grid of ``shape``, in that grid's voxels."""
    import torch.nn.functional as F

    old = disp.shape[axis]
    out = F.interpolate(disp[None, None], size=list(shape), mode="trilinear",
                        align_corners=True)[0, 0]
    return out * ((shape[axis] - 1) / max(old - 1, 1))


def _smoothness(disp):
    import torch

    membrane = bending = disp.new_zeros(())
    for dim in range(3):
        if disp.shape[dim] < 3:
            continue
        first = torch.gradient(disp, dim=dim)[0]
        membrane = membrane + (first**2).mean()
        bending = bending + (torch.gradient(first, dim=dim)[0] ** 2).mean()
    return MEMBRANE_WEIGHT * membrane + BENDING_WEIGHT * bending


@dataclass(frozen=True, eq=False)
class DistortionFit:
    """Outcome of :func:`estimate_displacement`.

    Attributes:
        displacement: (shape) voxels along the PE axis, of the image given first.
        unwarped: the mean of both images unwarped (undistorted b=0, on the image's grid).
        correlation_before / correlation_after: Pearson r of the two images within their joint
            foreground, as acquired and once unwarped (quality report; 1 is perfect).
    """

    displacement: np.ndarray
    unwarped: np.ndarray
    correlation_before: float
    correlation_after: float


def _foreground(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from .registration import _otsu_threshold

    both = np.maximum(a, b)
    return both > _otsu_threshold(both[both > 0]) if (both > 0).any() else both > 0


def estimate_displacement(
    image: np.ndarray,
    reverse: np.ndarray,
    *,
    axis: int,
    voxel_mm: float,
    ratio: float = 1.0,
    num_threads: int | None = None,
) -> DistortionFit:
    """The distortion of ``image`` from its reversed-PE partner ``reverse`` (same grid).

    Minimizes the mean squared difference of the two images unwarped in opposite directions
    (``d`` for ``image``, ``-ratio d`` for ``reverse``, each with its Jacobian) plus a membrane
    and bending penalty on ``d``, coarse to fine (:func:`_levels`), with Adam. Each image is
    scaled to mean 1 over its foreground, so the receiver gains of two runs need not match.
    Deterministic (no random draws).
    """
    import torch

    image = np.nan_to_num(np.asarray(image, dtype=np.float32))
    reverse = np.nan_to_num(np.asarray(reverse, dtype=np.float32))
    if image.shape != reverse.shape or image.ndim != 3:
        raise ValueError(f"need two 3D images on one grid, got {image.shape} and {reverse.shape}")
    if image.shape[axis] < 4:
        raise ValueError(f"the phase-encoding axis has only {image.shape[axis]} voxels")
    fg = _foreground(image, reverse)
    if not fg.any() or image[fg].mean() <= 0 or reverse[fg].mean() <= 0:
        raise ValueError("the reversed phase-encoding images have no signal")
    a, b = image / image[fg].mean(), reverse / reverse[fg].mean()

    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        disp = None
        for factor, iterations in zip(_levels(voxel_mm), LEVEL_ITERATIONS):
            level_a, level_b = _level_image(a, factor), _level_image(b, factor)
            if disp is None:
                disp = torch.zeros_like(level_a)
            else:
                disp = _resize_displacement(disp.detach(), level_a.shape, axis)
            disp.requires_grad_(True)
            optimizer = torch.optim.Adam([disp], lr=0.1)
            for _ in range(iterations):
                optimizer.zero_grad()
                jac = _jacobian(disp, axis)
                stretch_a, stretch_b = 1.0 + jac, 1.0 - ratio * jac
                diff = _shift(level_a, disp, axis) * stretch_a - \
                    _shift(level_b, -ratio * disp, axis) * stretch_b
                fold = (torch.relu(MIN_JACOBIAN - stretch_a) ** 2).mean() + \
                    (torch.relu(MIN_JACOBIAN - stretch_b) ** 2).mean()
                loss = (diff**2).mean() + _smoothness(disp) + fold
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            full = _resize_displacement(disp.detach(), image.shape, axis).numpy()
    finally:
        torch.set_num_threads(threads)

    unwarped_a = unwarp(image, full, axis)
    unwarped_b = unwarp(reverse, -ratio * full, axis)
    after_fg = _foreground(unwarped_a, unwarped_b)
    fit = DistortionFit(
        displacement=full.astype(np.float32),
        unwarped=((unwarped_a + unwarped_b) / 2.0).astype(np.float32),
        correlation_before=float(np.corrcoef(image[fg], reverse[fg])[0, 1]),
        correlation_after=float(np.corrcoef(unwarped_a[after_fg], unwarped_b[after_fg])[0, 1]),
    )
    LOGGER.info(
        "reversed-PE fit: displacement %.2f..%.2f voxels; b=0 pair r %.3f -> %.3f",
        float(full.min()), float(full.max()), fit.correlation_before, fit.correlation_after,
    )
    return fit
