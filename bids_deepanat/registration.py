"""Rigid (optionally affine) registration of an acquired T1w to the diffusion mean b=0 (SPEC §5).

Pure functions on NiBabel images and NumPy arrays; no Nipype, no files except the ITK
transform reader/writer.

Frames and conventions (all coordinates in mm):

- *World* coordinates are the scanner RAS+ coordinates given by each image's affine
  (NIfTI sform/qform, as NiBabel reads them). Both images are assumed to be in the same scanner
  space, so the header alignment is the identity in world space and is the starting point.
- A registration *matrix* is a 4x4 world-to-world transform acting on homogeneous column
  vectors. It maps **b0 (DWI) world coordinates to T1w world coordinates**: for a point ``p``
  of the head given in the b0 image's world, ``matrix @ p`` is where the same tissue lies in
  the T1w image's world. This is DIPY's convention with ``static`` = b0 and ``moving`` = T1w
  (``AffineMap.affine``), and it is the *pull-back* needed to resample the T1w onto the b0 grid:
  ``T1w_on_b0[v] = T1w(inv(T1w.affine) @ matrix @ b0.affine @ v)``.
- ITK/ANTs transform files use LPS+ physical coordinates; see :func:`write_itk_transform`.

Determinism: DIPY's mutual information with ``sampling_proportion`` set draws a randomly
jittered sample grid from an unseeded generator, so it is not reproducible. We use dense
sampling (``sampling_proportion=None``) instead; it is deterministic, and fast enough because the
b0 is cropped to the mask and the T1w brought down to half the b0 voxel size when finer.

Initialization: the optimization starts from the header alignment (identity). A centre-of-mass
initialization was deliberately *not* used: the T1w usually covers the whole head down to the
neck while the DWI covers a slab around the brain, so their intensity centroids differ by
centimetres even when the headers are exact (on the xa30 data it would start the search 51 mm
off). Header alignment between two scans of one session is good to a few mm/degrees, well
inside the capture range of the coarse-to-fine MI search (phantom: recovered from 13 mm /
6 degrees off to within 0.2 mm / 0.1 degree).

Whole-head T1w (no ``mask``; see :func:`_whole_head_inputs`): both images are bias-flattened
(homomorphic, 20 mm) and the MI is restricted to the b0 brain mask eroded by 6 mm, so that
near the header alignment the T1w is only ever sampled inside the brain; scalp, skull and the
receive-coil field no longer drive the search. On xa30 (whole-head 2 mm MPRAGE with strong coil
bias, single 3 mm b=0 of a b=2500 protocol) this took the departure from the header alignment
(max over the b0 brain) from 6.8 / 11.2 mm (AP / PA runs) to 4.1 / 2.2 mm, rotation 0.8 / 0.2
degrees; levels of 6 mm and native, or native only, give the same result to 0.03 mm.

EPI distortion: what is left after the whole-head preprocessing is a shift along the
phase-encoding axis of opposite sign in the two runs (y at the brain centre: +2.8 mm AP,
-1.9 mm PA), the signature of susceptibility distortion (20.7 Hz per 3 mm pixel), which no
rigid transform can represent and no rigid cost removes (pyramids, bins, erosion, stripping
all tried). Where a run has a reversed phase-encoding partner, the pipeline therefore first
undistorts the b=0 (:mod:`bids_deepanat.sdc`), registers the T1w to it (xa30: 1.3 mm and
0.4 degrees from the header alignment for both runs) and maps the registered T1w back into
the distorted grid with :func:`resample_to_grid` ``voxel_coords``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger(__name__)

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: RAS+ <-> LPS+ (ITK) change of coordinates; its own inverse.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ITK_HEADER = "#Insight Transform File V1.0"
_ITK_AFFINE_TYPES = (
    "AffineTransform_double_3_3",
    "AffineTransform_float_3_3",
    "MatrixOffsetTransformBase_double_3_3",
    "MatrixOffsetTransformBase_float_3_3",
)


@dataclass(frozen=True, eq=False)
class RegistrationResult:
    """Outcome of :func:`register_t1w_to_dwi`.

    Attributes:
        matrix: 4x4 world-to-world transform, **b0 world (RAS+, mm) -> T1w world (RAS+, mm)**
            (DIPY ``static`` = b0, ``moving`` = T1w). Rigid unless ``affine=True`` was asked.
        mutual_information: final MI (nats) between the b0 and the registered T1w, on the
            finest level, within the mask if one was given.
        initial_mutual_information: MI at the header alignment (identity), same setting; a
            successful registration increases it.
        resampled: the T1w resampled onto the b0 grid (b0 shape and affine), float32, linear
            interpolation, 0 outside the T1w field of view.
    """

    matrix: np.ndarray
    mutual_information: float
    initial_mutual_information: float
    resampled: nib.Nifti1Image

    @property
    def rotation_deg(self) -> float:
        """Rotation angle (degrees) of the transform's rotation part, relative to identity."""
        return rotation_angle_deg(self.matrix)

    @property
    def translation_mm(self) -> np.ndarray:
        """Translation column (mm); it depends on where the world origin is, so for a
        size-of-correction number prefer :func:`transform_error` against the identity."""
        return self.matrix[:3, 3].copy()


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


def is_brain_only(
    t1w_img: nib.Nifti1Image, b0_img: nib.Nifti1Image, mask: np.ndarray, *, margin_mm: float = 15.0
) -> bool:
    """Whether the T1w shows the brain only (skull-stripped, or the phantom), not the head.

    Looks at the T1w beyond ``margin_mm`` outside the b0 brain mask (placed by the headers):
    a whole-head image has scalp and fat there, as bright as brain; a brain-only image has
    background noise only.
    """
    from scipy import ndimage

    mask_img = nib.Nifti1Image(np.asarray(mask, dtype=np.float32), b0_img.affine)
    brain = np.asarray(resample_to_grid(mask_img, np.eye(4), t1w_img, order=0).dataobj) > 0.5
    if not brain.any():
        return False
    step = float(voxel_sizes(t1w_img.affine).mean())
    near = ndimage.binary_dilation(brain, iterations=max(1, round(margin_mm / step)))
    data = np.asarray(t1w_img.dataobj, dtype=np.float32)
    outside = data[~near]
    if outside.size == 0:
        return True
    return float(np.percentile(outside, 99)) < 0.25 * float(np.median(data[brain]))


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) along the three voxel axes of ``affine``."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def _closest_rotation(linear: np.ndarray) -> np.ndarray:
    """Rotation factor of the polar decomposition (the rigid part of an affine's 3x3)."""
    u, _, vt = np.linalg.svd(linear)
    rot = u @ vt
    if np.linalg.det(rot) < 0:  # keep a proper rotation even for a reflecting input
        u[:, -1] *= -1
        rot = u @ vt
    return rot


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Angle (degrees) of the rotation part of a 4x4 (or 3x3) transform, in [0, 180]."""
    rot = _closest_rotation(np.asarray(matrix, dtype=float)[:3, :3])
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))


def sphere_points(
    radius_mm: float = 80.0, centre_mm: Sequence[float] = (0.0, 0.0, 0.0), n: int = 2000
) -> np.ndarray:
    """``n`` nearly uniform points (n, 3) on a sphere (Fibonacci lattice), world mm."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = math.pi * (1.0 + math.sqrt(5.0)) * i
    r = np.sqrt(1.0 - z**2)
    unit = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    return np.asarray(centre_mm, dtype=float) + radius_mm * unit


def mask_points(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates (n, 3), mm, of the voxel centres where ``mask`` is true."""
    vox = np.argwhere(np.asarray(mask, dtype=bool)).astype(float)
    return vox @ np.asarray(affine, dtype=float)[:3, :3].T + np.asarray(affine)[:3, 3]


def transform_error(
    matrix: np.ndarray,
    reference: np.ndarray,
    *,
    points: np.ndarray | None = None,
    radius_mm: float = 80.0,
    centre_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[float, float]:
    """Disagreement between two 4x4 transforms of the same direction (e.g. estimate vs truth).

    Returns ``(max_displacement_mm, rotation_deg)``: the largest distance between
    ``matrix @ p`` and ``reference @ p`` over ``points`` (n, 3) in world mm, and the rotation
    angle of ``inv(reference) @ matrix``. Without ``points``, a sphere of ``radius_mm`` about
    ``centre_mm`` is used; for affine maps the displacement difference is affine in ``p``, so its
    maximum over the whole ball is attained on that sphere (the ball's extreme points).
    """
    matrix, reference = np.asarray(matrix, dtype=float), np.asarray(reference, dtype=float)
    if points is None:
        points = sphere_points(radius_mm, centre_mm)
    pts = np.asarray(points, dtype=float)
    diff = (matrix - reference)[:3, :3] @ pts.T + (matrix - reference)[:3, 3:4]
    max_disp = float(np.sqrt((diff**2).sum(axis=0)).max()) if pts.size else 0.0
    return max_disp, rotation_angle_deg(np.linalg.solve(reference, matrix))


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def mean_b0(
    dwi: nib.Nifti1Image, bvals: Sequence[float], *, b0_threshold: float = 50.0
) -> nib.Nifti1Image:
    """Mean of the volumes with b <= ``b0_threshold`` (s/mm²), float32, on the DWI grid."""
    bvals = np.asarray(bvals, dtype=float)
    b0 = bvals <= b0_threshold
    if dwi.ndim != 4 or dwi.shape[3] != bvals.size:
        raise ValueError(f"DWI shape {dwi.shape} does not match {bvals.size} b-values")
    if not b0.any():
        raise ValueError(f"no volume with b <= {b0_threshold:g} s/mm²")
    data = np.asarray(dwi.dataobj, dtype=np.float32)[..., b0].mean(axis=-1)
    return nib.Nifti1Image(data.astype(np.float32), dwi.affine)


def downsample(img: nib.Nifti1Image, voxel_size_mm: float) -> nib.Nifti1Image:
    """``img`` smoothed and resampled to at most ``voxel_size_mm`` resolution per axis.

    The grid keeps the voxel axes (orientation) and field of view of ``img``; axes already
    coarser than the target are left alone. Gaussian pre-smoothing brings the point spread to
    about one target voxel (FWHM), which avoids aliasing when the MI metric samples the
    T1w at b0 voxel centres. Voxel centres of the new grid sit at block centres of the old one,
    so the world position of the image content is unchanged.
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {data.shape}")
    zooms = voxel_sizes(img.affine)
    factor = np.maximum(voxel_size_mm / zooms, 1.0)
    if np.all(factor < 1.01):
        return nib.Nifti1Image(data, img.affine)
    # FWHM² adds: the image already has about one voxel of blur.
    sigma_vox = np.sqrt(np.maximum(factor**2 - 1.0, 0.0)) / _FWHM_PER_SIGMA
    smooth = ndimage.gaussian_filter(data, sigma_vox, mode="nearest")
    shape = np.maximum(np.floor(np.array(data.shape) / factor).astype(int), 1)
    # New voxel v sits at old voxel coordinate (v + 0.5) * factor - 0.5 (block centre).
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factor)
    scale[:3, 3] = (factor - 1.0) / 2.0
    coords = np.indices(tuple(shape), dtype=np.float32).reshape(3, -1)
    coords = coords * factor[:, None].astype(np.float32) + scale[:3, 3:4].astype(np.float32)
    out = ndimage.map_coordinates(smooth, coords, order=1, mode="nearest").reshape(shape)
    return nib.Nifti1Image(out.astype(np.float32), img.affine @ scale)


def resample_to_grid(
    img: nib.Nifti1Image,
    matrix: np.ndarray,
    reference_img: nib.Nifti1Image,
    *,
    order: int = 1,
    voxel_coords: np.ndarray | None = None,
) -> nib.Nifti1Image:
    """``img`` resampled onto the grid (shape[:3], affine) of ``reference_img``; float32.

    ``matrix`` maps reference world -> ``img`` world (RAS+, mm), the convention of
    :attr:`RegistrationResult.matrix` with ``img`` = T1w and ``reference_img`` = b0. Voxels
    that fall outside ``img`` are 0. ``order`` is the spline order (1 = trilinear).
    ``voxel_coords`` (3, *shape), if given, are the reference-voxel positions to sample for each
    output voxel instead of the voxel itself (e.g. :func:`bids_deepanat.sdc.true_positions`,
    to map an undistorted image into a distorted EPI grid).
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    ref_shape = tuple(int(s) for s in reference_img.shape[:3])
    vox2vox = np.linalg.inv(img.affine) @ np.asarray(matrix, dtype=float) @ reference_img.affine
    if voxel_coords is None:
        out = ndimage.affine_transform(
            data, vox2vox, output_shape=ref_shape, order=order, mode="constant", cval=0.0
        )
    else:
        coords = np.asarray(voxel_coords, dtype=np.float64).reshape(3, -1)
        if coords.shape[1] != int(np.prod(ref_shape)):
            raise ValueError(f"voxel_coords do not cover the reference grid {ref_shape}")
        moved = vox2vox[:3, :3] @ coords + vox2vox[:3, 3:4]
        out = ndimage.map_coordinates(
            data, moved, order=order, mode="constant", cval=0.0
        ).reshape(ref_shape)
    result = nib.Nifti1Image(out.astype(np.float32), reference_img.affine)
    result.header.set_xyzt_units("mm")
    return result


def _robust_intensities(data: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Intensities clipped to [0, 99.5th percentile of the non-zero voxels], float64.

    DIPY spreads the MI histogram bins between the image minimum and maximum; a few very bright
    voxels (vessels, fat, noise spikes) would otherwise squeeze the brain into a couple of bins.
    """
    data = np.nan_to_num(np.asarray(data, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    values = data[mask] if mask is not None else data
    values = values[values > 0]
    if values.size == 0:
        raise ValueError("image has no positive intensities")
    return np.clip(data, 0.0, np.percentile(values, 99.5))


def _overlap_mask(
    moving_img: nib.Nifti1Image, static_img: nib.Nifti1Image, static_mask: np.ndarray | None
) -> np.ndarray:
    """Moving voxels that the header alignment puts inside the static mask (or field of view).

    Used only to choose the moving image's intensity range: a whole-head T1w has very bright
    scalp fat, and its brain would end up in a few histogram bins if the range were taken over
    the whole head.
    """
    region = (
        np.ones(static_img.shape[:3], dtype=np.float32)
        if static_mask is None
        else (np.asarray(static_mask, dtype=np.float32))
    )
    region_img = nib.Nifti1Image(region, static_img.affine)
    inside = np.asarray(resample_to_grid(region_img, np.eye(4), moving_img, order=0).dataobj) > 0
    return inside if inside.any() else np.ones(moving_img.shape[:3], dtype=bool)


# --------------------------------------------------------------------------------------------
# Whole-head T1w: intensity flattening and the brain interior
# --------------------------------------------------------------------------------------------

#: FWHM (mm) of the smooth multiplicative field removed by :func:`flatten_intensity`.
BIAS_FWHM_MM = 20.0
#: Depth (mm) by which the b0 brain mask is eroded for whole-head T1w registration.
INTERIOR_MARGIN_MM = 6.0


def _otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's two-class threshold of ``values`` (maximal between-class variance)."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64), nbins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    return float(centres[int(np.nanargmax(between[:-1]))])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def head_mask(data: np.ndarray) -> np.ndarray:
    """Foreground (head) of a structural image: Otsu on log intensities, holes filled.

    Log intensities separate the near-zero background from tissue of any brightness, so the
    dark centre of a receive-coil-biased image is not lost to the bright periphery. Holes are
    filled in 3D and per axial slice (the head is open at the neck), largest component kept.
    """
    data = np.nan_to_num(np.asarray(data, dtype=np.float32))
    logs = np.log1p(np.maximum(data, 0.0))
    mask = logs > _otsu_threshold(logs.ravel())
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return _largest_component(mask)


def flatten_intensity(
    data: np.ndarray, mask: np.ndarray, voxel_mm: float, *, fwhm_mm: float = BIAS_FWHM_MM
) -> np.ndarray:
    """Homomorphic bias correction: ``data`` divided by its smooth local mean within ``mask``.

    The local mean is a normalized convolution (Gaussian of ``fwhm_mm``, computed within
    ``mask`` only, so the background does not darken the edge). Receive-coil sensitivity is a
    smooth multiplicative field; left in, it is a radially symmetric bright rim in both the
    T1w and the b0 that MI happily matches by rotating about the head centre (xa30: 50-100 deg
    runaways without it). Structure finer than ``fwhm_mm`` (tissue contrast) is kept. 0 outside
    ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    data = np.where(mask, np.nan_to_num(np.asarray(data, dtype=np.float64)), 0.0)
    sigma = fwhm_mm / _FWHM_PER_SIGMA / max(float(voxel_mm), 1e-3)
    num = ndimage.gaussian_filter(data, sigma, mode="constant")
    den = ndimage.gaussian_filter(mask.astype(np.float64), sigma, mode="constant")
    field = num / np.maximum(den, 1e-6)
    ok = mask & (field > 1e-6 * max(float(field.max()), 1e-30))
    out = np.zeros_like(data)
    out[ok] = data[ok] / field[ok]
    return out.astype(np.float32)


def _whole_head_inputs(
    t1w_img: nib.Nifti1Image, b0_img: nib.Nifti1Image
) -> tuple[nib.Nifti1Image, nib.Nifti1Image, np.ndarray]:
    """Bias-flattened T1w and b0, and the b0 brain interior used as the MI mask.

    With a whole-head T1w, MI over the whole field is dominated by scalp fat, skull and the
    receive-coil field, and MI within the b0 brain mask rewards pulling scalp into it. Both
    problems vanish if the MI only sees the *interior* of the brain: the b0 brain mask
    (:func:`bids_deepanat.dmri.brain_mask`) eroded by :data:`INTERIOR_MARGIN_MM`, more than
    the header misalignment expected between two scans of a session, so that every candidate
    transform near the header alignment samples brain in the T1w, never scalp. No T1w brain
    extraction is needed. Both images are flattened (:func:`flatten_intensity`) first.
    """
    from .dmri import brain_mask

    b0_voxel = float(voxel_sizes(b0_img.affine).mean())
    b0_data = np.asarray(b0_img.dataobj, dtype=np.float32)
    brain = brain_mask(b0_data, b0_voxel)
    if not brain.any():
        raise ValueError("could not find the brain in the b0 image")
    steps = max(1, round(INTERIOR_MARGIN_MM / b0_voxel))
    interior = ndimage.binary_erosion(brain, iterations=steps)
    if interior.sum() < 0.1 * brain.sum():
        interior = brain
    b0_flat = nib.Nifti1Image(flatten_intensity(b0_data, brain, b0_voxel), b0_img.affine)
    t1w_data = np.asarray(t1w_img.dataobj, dtype=np.float32)
    t1w_voxel = float(voxel_sizes(t1w_img.affine).mean())
    t1w_flat = nib.Nifti1Image(
        flatten_intensity(t1w_data, head_mask(t1w_data), t1w_voxel), t1w_img.affine
    )
    return t1w_flat, b0_flat, interior


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def _pyramid(voxel_mm: float, coarsest_mm: float = 12.0) -> tuple[list[int], list[float]]:
    """Shrink factors and smoothing sigmas (static voxels) for a coarse-to-fine MI search.

    The coarsest level is at most ``coarsest_mm`` per voxel: by default about 8-12 mm whatever
    the b0 resolution (factor 4 at 2-3 mm, factor 2 at 4-5 mm); each level halves the voxel size
    down to the native grid. The whole-head path limits it to :data:`INTERIOR_MARGIN_MM`, since
    coarser levels would blur the scalp into the eroded brain interior and leave it few voxels
    (xa30: 12 mm levels ran off by 30-180 mm).
    """
    factors = [f for f in (4, 2) if voxel_mm * f <= coarsest_mm + 1e-6] + [1]
    sigmas = [f / 2.0 if f > 1 else 0.0 for f in factors]
    return factors, sigmas


@dataclass(frozen=True, eq=False)
class _Inputs:
    """Static (b0) and moving (T1w) arrays as the MI metric sees them."""

    static: np.ndarray  # float64, clipped intensities, possibly cropped b0 grid
    static_affine: np.ndarray
    static_mask: np.ndarray | None  # int32 on the static grid
    moving: np.ndarray  # float64, clipped intensities, possibly downsampled T1w grid
    moving_affine: np.ndarray


def _prepare(t1w_img: nib.Nifti1Image, b0_img: nib.Nifti1Image, mask: np.ndarray | None) -> _Inputs:
    """Crop the b0 to the mask, bring the T1w to about half the b0 voxel size, clip intensities.

    The T1w keeps detail down to half a b0 voxel: matching it to the b0 voxel size exactly made
    the MI landscape step-like (interpolation artefacts of two equal grids) and cost accuracy
    on the phantom (0.4 mm -> 1.7-2.7 mm error); finer detail only costs time.
    """
    if len(t1w_img.shape) != 3 or len(b0_img.shape) != 3:
        raise ValueError(f"expected 3D images, got T1w {t1w_img.shape} and b0 {b0_img.shape}")
    static_img, static_mask = b0_img, None
    if mask is not None:
        static_mask = np.asarray(mask, dtype=bool)
        if static_mask.shape != tuple(b0_img.shape):
            raise ValueError(f"mask shape {static_mask.shape} != b0 shape {b0_img.shape}")
        if not static_mask.any():
            raise ValueError("the registration mask is empty")
        static_img, static_mask = crop_to_mask(b0_img, static_mask)
    b0_voxel = float(voxel_sizes(b0_img.affine).mean())
    moving_img = downsample(t1w_img, b0_voxel / 2.0)
    static = _robust_intensities(np.asarray(static_img.dataobj, dtype=np.float64), static_mask)
    moving = _robust_intensities(
        np.asarray(moving_img.dataobj, dtype=np.float64),
        _overlap_mask(moving_img, static_img, static_mask),
    )
    return _Inputs(
        static=static,
        static_affine=np.asarray(static_img.affine, dtype=float),
        static_mask=None if static_mask is None else static_mask.astype(np.int32),
        moving=moving,
        moving_affine=np.asarray(moving_img.affine, dtype=float),
    )


def _metric_value(inputs: _Inputs, matrix: np.ndarray, nbins: int) -> float:
    """MI (nats) of prepared inputs under ``matrix`` (static world -> moving world)."""
    from dipy.align.imaffine import MutualInformationMetric
    from dipy.align.transforms import TranslationTransform3D

    metric = MutualInformationMetric(nbins=nbins, sampling_proportion=None)
    transform = TranslationTransform3D()
    metric.setup(
        transform,
        inputs.static,
        inputs.moving,
        static_grid2world=inputs.static_affine,
        moving_grid2world=inputs.moving_affine,
        starting_affine=np.asarray(matrix, dtype=float),
        static_mask=inputs.static_mask,
    )
    # distance() is -MI at the given parameters (here: no extra translation).
    return -float(metric.distance(transform.get_identity_parameters()))


def mutual_information(
    b0_img: nib.Nifti1Image,
    t1w_img: nib.Nifti1Image,
    matrix: np.ndarray | None = None,
    *,
    mask: np.ndarray | None = None,
    nbins: int = 32,
) -> float:
    """Mutual information (nats) of the b0 and the T1w under ``matrix`` (b0 -> T1w world).

    Computed with DIPY's Parzen-window estimator on the b0 grid (dense, within ``mask`` if
    given), with the same preprocessing as :func:`register_t1w_to_dwi` (without ``mask``: the
    flattened images within the b0 brain interior); for comparing alignments of one pair
    (values are not comparable across subjects).
    """
    if mask is None:
        inputs = _prepare(*_whole_head_inputs(t1w_img, b0_img))
    else:
        inputs = _prepare(t1w_img, b0_img, mask)
    return _metric_value(inputs, np.eye(4) if matrix is None else matrix, nbins)


def register_t1w_to_dwi(
    t1w_img: nib.Nifti1Image,
    b0_img: nib.Nifti1Image,
    *,
    mask: np.ndarray | None = None,
    affine: bool = False,
    nbins: int = 32,
    level_iters: Sequence[int] | None = None,
) -> RegistrationResult:
    """Register an acquired T1w to the diffusion mean b=0 by mutual information (DIPY).

    Stages: translation -> rigid -> (``affine=True``) full affine, each started from the result
    of the previous one, the first from the header alignment (identity; see the module
    docstring for why no centre-of-mass initialization). Each stage runs a coarse-to-fine
    pyramid on the b0 grid (:func:`_pyramid`). Preprocessing (:func:`_prepare`): the b0 is
    cropped to the mask's bounding box, the T1w smoothed and resampled to half the b0 voxel size
    when it is finer than that (fine detail carries no information at the b0 resolution and
    only costs time), and intensities are clipped at a high percentile so that the histogram
    bins cover the brain. Dense sampling makes the result deterministic.

    Args:
        t1w_img: 3D T1w image (moving).
        b0_img: 3D mean b=0 image (static), e.g. from :func:`mean_b0`.
        mask: optional boolean array on the b0 grid; only these b0 voxels enter the MI.
            Only use a brain mask when the T1w is brain-only too (skull-stripped, or the
            phantom): then it is the most accurate choice (phantom: 0.3-0.5 mm). With a
            whole-head T1w, MI restricted to the b0 brain rewards moving scalp and background
            into the brain region and the search runs off (xa30: 10-100 mm); use None there:
            both images are then bias-flattened and the MI is taken within the b0 brain mask
            (found here) eroded by :data:`INTERIOR_MARGIN_MM`, with a pyramid no coarser than
            that margin (see :func:`_whole_head_inputs`).
        affine: add a 12-parameter affine stage after the rigid one (e.g. to absorb EPI scaling);
            default rigid only, which is what two scans of one head need.
        nbins: histogram bins of the MI estimate.
        level_iters: maximal iterations per pyramid level, coarsest first; default 200 per level.

    Returns:
        :class:`RegistrationResult`; ``matrix`` maps **b0 world -> T1w world** (RAS+, mm).
    """
    from dipy.align.imaffine import AffineRegistration, MutualInformationMetric
    from dipy.align.transforms import (
        AffineTransform3D,
        RigidTransform3D,
        TranslationTransform3D,
    )

    b0_voxel = float(voxel_sizes(b0_img.affine).mean())
    if mask is None:
        inputs = _prepare(*_whole_head_inputs(t1w_img, b0_img))
        factors, sigmas = _pyramid(b0_voxel, INTERIOR_MARGIN_MM)
    else:
        inputs = _prepare(t1w_img, b0_img, mask)
        factors, sigmas = _pyramid(b0_voxel)
    iters = list(level_iters) if level_iters is not None else [200] * len(factors)
    if len(iters) != len(factors):
        raise ValueError(f"level_iters needs {len(factors)} entries (one per pyramid level)")

    registration = AffineRegistration(
        metric=MutualInformationMetric(nbins=nbins, sampling_proportion=None),
        level_iters=iters,
        sigmas=sigmas,
        factors=factors,
        verbosity=0,
    )
    stages = [TranslationTransform3D(), RigidTransform3D()]
    if affine:
        stages.append(AffineTransform3D())
    initial_mi = _metric_value(inputs, np.eye(4), nbins)
    current = np.eye(4)
    for transform in stages:
        affine_map = registration.optimize(
            inputs.static,
            inputs.moving,
            transform,
            None,
            static_grid2world=inputs.static_affine,
            moving_grid2world=inputs.moving_affine,
            starting_affine=current,
            static_mask=inputs.static_mask,
        )
        current = np.asarray(affine_map.affine, dtype=float)
        LOGGER.debug(
            "%s stage: rotation %.2f deg", type(transform).__name__, rotation_angle_deg(current)
        )
    final_mi = _metric_value(inputs, current, nbins)
    if final_mi < initial_mi:
        LOGGER.warning(
            "registration lowered the mutual information (%.4f -> %.4f); check the result",
            initial_mi,
            final_mi,
        )
    shift_mm, angle = transform_error(current, np.eye(4), centre_mm=b0_centre(b0_img))
    LOGGER.info(
        "T1w->b0 registration: MI %.4f -> %.4f; correction up to %.2f mm (80 mm sphere), %.2f deg",
        initial_mi,
        final_mi,
        shift_mm,
        angle,
    )
    return RegistrationResult(
        matrix=current,
        mutual_information=final_mi,
        initial_mutual_information=initial_mi,
        resampled=resample_to_grid(t1w_img, current, b0_img),
    )


def crop_to_mask(
    img: nib.Nifti1Image, mask: np.ndarray, *, margin_vox: int = 2
) -> tuple[nib.Nifti1Image, np.ndarray]:
    """``img`` and ``mask`` cut to the bounding box of ``mask`` plus ``margin_vox`` voxels.

    The affine is shifted so that world positions are unchanged. Dense MI costs time per voxel of
    the static grid, masked or not, so cropping the empty surroundings is a free speed-up.
    """
    mask = np.asarray(mask, dtype=bool)
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin_vox, 0)
    hi = np.minimum(idx.max(axis=0) + margin_vox + 1, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    data = np.asarray(img.dataobj, dtype=np.float32)[box]
    shift = np.eye(4)
    shift[:3, 3] = lo
    return nib.Nifti1Image(data, img.affine @ shift), mask[box]


def b0_centre(img: nib.Nifti1Image) -> np.ndarray:
    """World coordinates (mm) of the centre of the field of view of ``img``."""
    centre_vox = (np.array(img.shape[:3], dtype=float) - 1.0) / 2.0
    return img.affine[:3, :3] @ centre_vox + img.affine[:3, 3]


# --------------------------------------------------------------------------------------------
# ITK / ANTs transform files
# --------------------------------------------------------------------------------------------


def ras_to_lps(matrix: np.ndarray) -> np.ndarray:
    """A 4x4 world transform expressed in RAS+ coordinates, re-expressed in LPS+ (ITK).

    ``F @ M @ F`` with ``F = diag(-1, -1, 1, 1)``; the same formula converts LPS -> RAS.
    """
    return _RAS_TO_LPS @ np.asarray(matrix, dtype=float) @ _RAS_TO_LPS


def write_itk_transform(matrix: np.ndarray, path: str | Path) -> Path:
    """Write a 4x4 RAS+ world transform as an ITK text transform (``.txt``/``.tfm``).

    Direction: ITK/ANTs transform files map points of the *fixed/reference* space to the
    *moving* space (``antsApplyTransforms -r reference -i moving -t file``). Pass
    :attr:`RegistrationResult.matrix` (b0 world -> T1w world) to get a file that resamples the
    T1w (moving) onto the b0 (reference) with antsApplyTransforms, and that ANTs reads as the
    T1w-to-b0 registration.

    The matrix is converted to ITK's LPS+ physical coordinates and stored as
    ``AffineTransform_double_3_3`` with ``FixedParameters`` (centre) 0 0 0, so that the ITK
    offset equals the LPS translation column.
    """
    lps = ras_to_lps(matrix)
    if not np.allclose(lps[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError("not an affine 4x4 matrix (last row must be 0 0 0 1)")
    params = [*lps[:3, :3].ravel(), *lps[:3, 3]]
    text = (
        f"{_ITK_HEADER}\n"
        "#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(repr(float(p)) for p in params)}\n"
        "FixedParameters: 0 0 0\n"
    )
    path = Path(path)
    path.write_text(text)
    return path


def read_itk_transform(path: str | Path) -> np.ndarray:
    """Read a single affine ITK text transform and return it as a 4x4 RAS+ world matrix.

    Inverse of :func:`write_itk_transform` (same direction: reference -> moving). A non-zero
    centre (``FixedParameters``) is honoured: ITK maps ``x -> A (x - c) + c + t``.
    """
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise ValueError(f"{path}: not an ITK text transform file")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("#"):
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        if key in fields:
            raise ValueError(f"{path}: more than one transform; only single affines are read")
        fields[key] = value.strip()
    kind = fields.get("Transform", "")
    if kind not in _ITK_AFFINE_TYPES:
        raise ValueError(f"{path}: unsupported transform type {kind!r}")
    params = np.array(fields["Parameters"].split(), dtype=float)
    centre = np.array(fields.get("FixedParameters", "0 0 0").split(), dtype=float)
    if params.size != 12 or centre.size != 3:
        raise ValueError(f"{path}: expected 12 parameters and a 3-vector centre")
    linear = params[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = params[9:] + centre - linear @ centre
    return ras_to_lps(lps)
