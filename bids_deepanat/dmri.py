"""Diffusion input maps of DeepAnat (SPEC §1, §3), as pure functions on arrays.

Gradient directions travel in two conventions:

- *FSL/BIDS b-vectors* (``.bvec`` files): components along the image's voxel axes, with the first
  component negated when the affine has a positive determinant (FSL treats such images as if they
  were stored radiologically).
- *voxel-frame gradients* (``g_vox``): plain unit vectors along the voxel axes i, j, k of an
  image. All fitting happens in the voxel frame of the RAS+ (closest canonical) image, so the maps
  do not depend on how a file stores its axes.

Diffusivities are in µm²/ms (= 10⁻³ mm²/s); b-values in s/mm².
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from nibabel import orientations

from .errors import InvalidInputError

LOGGER = logging.getLogger(__name__)

#: The 11 model input channels, in the order the network expects them (SPEC §1).
CHANNELS: tuple[str, ...] = (
    "meanb0", "meandwi", "L1", "L2", "L3", "dwi1", "dwi2", "dwi3", "dwi4", "dwi5", "dwi6",
)

_DSM6 = np.array(
    [
        [0.91, 0.416, 0.0],
        [0.0, 0.91, 0.416],
        [0.416, 0.0, 0.91],
        [0.91, -0.416, 0.0],
        [0.0, 0.91, -0.416],
        [-0.416, 0.0, 0.91],
    ]
)
#: The six DSM6 directions (unit rows) along which dwi1..dwi6 are synthesized, RAS+ voxel frame.
DSM6_DIRECTIONS: np.ndarray = _DSM6 / np.linalg.norm(_DSM6, axis=1, keepdims=True)

SYNTHETIC_BVAL = 1000.0  # s/mm², b-value of the synthesized DWIs
MAX_EIGENVALUE_UM2_PER_MS = 5.0
SHELL_TOLERANCE = 100.0  # s/mm²: b-values closer than this belong to one shell


# --------------------------------------------------------------------------- gradients


def _x_flip(affine: np.ndarray) -> np.ndarray:
    sign = -1.0 if np.linalg.det(np.asarray(affine)[:3, :3]) > 0 else 1.0
    return np.array([sign, 1.0, 1.0])


def fsl_bvecs_to_voxel(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Turn (N, 3) FSL/BIDS b-vectors of an image with ``affine`` into voxel-frame gradients."""
    return np.asarray(bvecs, dtype=float) * _x_flip(affine)


def voxel_to_fsl_bvecs(g_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fsl_bvecs_to_voxel`: (N, 3) voxel-frame gradients to FSL/BIDS b-vectors."""
    return np.asarray(g_vox, dtype=float) * _x_flip(affine)


def read_gradients(bval_text: str, bvec_text: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``.bval``/``.bvec`` file contents into (N,) b-values and (N, 3) b-vectors.

    Accepts the FSL layout (3 rows) and the transposed one (3 columns).
    """
    try:
        bvals = np.array(bval_text.split(), dtype=float)
    except ValueError as err:
        raise InvalidInputError(f"b-values are not numbers ({err})") from None
    rows = [line.split() for line in bvec_text.splitlines() if line.strip()]
    try:
        bvecs = np.array(rows, dtype=float)
    except ValueError:
        raise InvalidInputError("b-vectors are not a numeric table") from None
    if bvecs.ndim == 2 and bvecs.shape[0] == 3:
        bvecs = bvecs.T  # FSL layout: rows of x, y and z (also for exactly three volumes)
    if bvecs.ndim != 2 or bvecs.shape[1] != 3:
        raise InvalidInputError(f"b-vectors must be a 3xN table, got shape {bvecs.shape}")
    return bvals, bvecs


def validate_gradients(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    n_volumes: int,
    *,
    b0_threshold: float = 50.0,
) -> np.ndarray:
    """Check a gradient table against its image and return unit b-vectors.

    Raises :class:`InvalidInputError` with the reason when the table cannot support a tensor fit:
    count mismatch, non-finite values, negative b-values, no b=0, only b=0, zero-norm vectors at
    b > 0, or fewer than 6 non-collinear directions.
    """
    if len(bvals) != n_volumes or len(bvecs) != n_volumes:
        raise InvalidInputError(
            f"gradient table has {len(bvals)} b-values and {len(bvecs)} b-vectors "
            f"but the image has {n_volumes} volumes"
        )
    if not np.all(np.isfinite(bvals)):
        raise InvalidInputError("b-values contain NaN or Inf")
    if np.any(bvals < 0):
        raise InvalidInputError("b-values contain negative numbers")
    is_b0 = bvals <= b0_threshold
    if not is_b0.any():
        raise InvalidInputError(f"no b=0 volume (no b-value <= {b0_threshold:g} s/mm²)")
    if is_b0.all():
        raise InvalidInputError("only b=0 volumes: no diffusion-weighted volume to fit")
    dwi_vecs = bvecs[~is_b0]
    bad = ~np.all(np.isfinite(dwi_vecs), axis=1)
    bad[~bad] = np.linalg.norm(dwi_vecs[~bad], axis=1) < 1e-6
    if bad.any():
        idx = np.flatnonzero(~is_b0)[bad]
        raise InvalidInputError(
            f"b-vectors of volumes {idx.tolist()} (b > 0) are zero or not finite"
        )
    unit = np.zeros_like(bvecs, dtype=float)
    unit[~is_b0] = dwi_vecs / np.linalg.norm(dwi_vecs, axis=1, keepdims=True)
    if _n_tensor_directions(unit[~is_b0]) < 6:
        raise InvalidInputError(
            "fewer than 6 non-collinear diffusion directions: a tensor cannot be fitted"
        )
    return unit


def _n_tensor_directions(unit_vecs: np.ndarray) -> int:
    """Rank of the tensor design matrix: how many independent tensor elements the scheme sees."""
    x, y, z = unit_vecs.T
    design = np.stack([x * x, y * y, z * z, 2 * x * y, 2 * x * z, 2 * y * z], axis=1)
    return int(np.linalg.matrix_rank(design, tol=1e-3))


# --------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class Reorientation:
    """A permutation/flip of voxel axes (see :mod:`nibabel.orientations`), by default to RAS+.

    ``ornt[i] = (j, s)``: input axis i becomes output axis j, reversed when s == -1.
    """

    ornt: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def to_ras(cls, affine: np.ndarray, shape: tuple[int, ...]) -> Reorientation:
        return cls(orientations.io_orientation(affine), tuple(int(s) for s in shape[:3]))

    def apply(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(orientations.apply_orientation(data, self.ornt))

    def undo(self, data: np.ndarray) -> np.ndarray:
        inverse = np.zeros_like(self.ornt)
        for axis, (new_axis, flip) in enumerate(self.ornt):
            inverse[int(new_axis)] = (axis, flip)
        return np.ascontiguousarray(orientations.apply_orientation(data, inverse))

    def apply_to_affine(self, affine: np.ndarray) -> np.ndarray:
        return affine @ orientations.inv_ornt_aff(self.ornt, self.shape)

    def apply_to_gradients(self, g_vox: np.ndarray) -> np.ndarray:
        g_vox = np.asarray(g_vox, dtype=float)
        g_new = np.zeros_like(g_vox)
        for axis, (new_axis, flip) in enumerate(self.ornt):
            g_new[:, int(new_axis)] = flip * g_vox[:, axis]
        return g_new


# --------------------------------------------------------------------------- maps


@dataclass(frozen=True)
class VolumeSelection:
    """Which volumes are b=0 and which diffusion-weighted volumes enter the tensor fit."""

    b0: np.ndarray  # bool (N,)
    dti: np.ndarray  # bool (N,), diffusion-weighted volumes used for meandwi and the fit
    fallback_shell: float | None = None  # set when no DWI was <= dti_max_bval


def select_volumes(
    bvals: np.ndarray, *, b0_threshold: float = 50.0, dti_max_bval: float = 1500.0
) -> VolumeSelection:
    """b=0 volumes (b <= ``b0_threshold``) and DTI volumes (b <= ``dti_max_bval``).

    If no diffusion-weighted volume qualifies, the lowest non-zero shell is used instead.
    """
    bvals = np.asarray(bvals, dtype=float)
    b0 = bvals <= b0_threshold
    dwi = ~b0
    dti = dwi & (bvals <= dti_max_bval)
    if dti.any():
        return VolumeSelection(b0, dti)
    lowest = float(bvals[dwi].min())
    dti = dwi & (bvals <= lowest + SHELL_TOLERANCE)
    shell = float(np.round(np.median(bvals[dti])))
    return VolumeSelection(b0, dti, fallback_shell=shell)


def fit_tensor(
    data: np.ndarray,
    bvals: np.ndarray,
    g_vox: np.ndarray,
    mask: np.ndarray,
    *,
    b0_threshold: float = 50.0,
) -> tuple[np.ndarray, np.ndarray]:
    """DIPY weighted-least-squares tensor fit inside ``mask``.

    Returns eigenvalues (X, Y, Z, 3) in µm²/ms, descending and clipped to [0, 5], and eigenvectors
    (X, Y, Z, 3, 3) as columns, in the voxel frame of ``g_vox``. Outside the mask both are 0.
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    gtab = gradient_table(np.asarray(bvals, float), bvecs=g_vox, b0_threshold=b0_threshold)
    with np.errstate(all="ignore"):
        fit = TensorModel(gtab, fit_method="WLS").fit(data, mask=mask)
        evals = np.asarray(fit.evals, dtype=np.float64) * 1e3  # mm²/s -> µm²/ms
        evecs = np.asarray(fit.evecs, dtype=np.float64)
    evals = np.clip(np.nan_to_num(evals, nan=0.0, posinf=0.0, neginf=0.0), 0.0,
                    MAX_EIGENVALUE_UM2_PER_MS)
    evecs = np.nan_to_num(evecs, nan=0.0, posinf=0.0, neginf=0.0)
    evals[~mask] = 0.0
    evecs[~mask] = 0.0
    return evals, evecs


def synthesize_dwis(
    meanb0: np.ndarray,
    evals_um2_per_ms: np.ndarray,
    evecs: np.ndarray,
    *,
    directions: np.ndarray = DSM6_DIRECTIONS,
    bval: float = SYNTHETIC_BVAL,
) -> np.ndarray:
    """DWIs predicted by the tensor: ``meanb0 · exp(−b gᵀDg)`` for each direction, (X, Y, Z, K)."""
    # gᵀDg = Σ_k λ_k (v_k·g)² without building D.
    projections = np.einsum("...ik,di->...dk", evecs, directions)
    adc_um2_per_ms = np.einsum("...dk,...k->...d", projections**2, evals_um2_per_ms)
    return meanb0[..., None] * np.exp(-bval * 1e-3 * adc_um2_per_ms)


def brain_mask(meanb0: np.ndarray, voxel_size_mm: float) -> np.ndarray:
    """Brain mask from the mean b=0 image: DIPY median_otsu, holes filled, largest component."""
    from dipy.segment.mask import median_otsu
    from scipy import ndimage

    # median_otsu's radius is in voxels; keep its footprint near 8 mm whatever the resolution.
    radius = int(np.clip(round(8.0 / max(voxel_size_mm, 1e-3)), 1, 4))
    _, mask = median_otsu(meanb0.astype(np.float64), median_radius=radius, numpass=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask.astype(bool)


@dataclass
class DiffusionMaps:
    """The 11 channels of :data:`CHANNELS` and the brain mask, on the input image's grid."""

    maps: np.ndarray  # (X, Y, Z, 11) float32
    mask: np.ndarray  # (X, Y, Z) bool
    warnings: list[str] = field(default_factory=list)
    channels: tuple[str, ...] = CHANNELS

    def channel(self, name: str) -> np.ndarray:
        return self.maps[..., self.channels.index(name)]


def compute_maps(
    data: np.ndarray,
    affine: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    b0_threshold: float = 50.0,
    dti_max_bval: float = 1500.0,
    mask: np.ndarray | None = None,
) -> DiffusionMaps:
    """All 11 DeepAnat input maps from a 4D DWI array and its FSL/BIDS gradient table.

    The data are brought to RAS+ voxel order, fitted there, and the maps returned on the input
    grid. meanb0 and meandwi cover the field of view; tensor channels are 0 outside the mask.
    ``mask`` (input grid, optional) replaces the automatic mask.
    """
    warnings: list[str] = []
    data = np.asarray(data)
    if data.ndim != 4:
        raise InvalidInputError(f"expected a 4D diffusion image, got {data.ndim}D")
    if data.shape[3] != len(bvals):
        raise InvalidInputError(
            f"gradient table has {len(bvals)} entries but the image has {data.shape[3]} volumes"
        )
    data = data.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        warnings.append(f"{int(data.size - finite.sum())} NaN/Inf voxel values set to 0")
        data = np.where(finite, data, 0.0).astype(np.float32)
    if not np.any(data):
        raise InvalidInputError("the diffusion image is all zeros")

    bvals, bvecs = np.asarray(bvals, dtype=float), np.asarray(bvecs, dtype=float)
    empty = ~np.any(data.reshape(-1, data.shape[3]), axis=0)
    if empty.any():
        warnings.append(f"volumes {np.flatnonzero(empty).tolist()} are all zeros and are ignored")
        data, bvals, bvecs = data[..., ~empty], bvals[~empty], bvecs[~empty]
    unit = validate_gradients(bvals, bvecs, data.shape[3], b0_threshold=b0_threshold)

    reo = Reorientation.to_ras(affine, data.shape)
    data_ras = reo.apply(data)
    g_ras = reo.apply_to_gradients(fsl_bvecs_to_voxel(unit, affine))

    selection = select_volumes(bvals, b0_threshold=b0_threshold, dti_max_bval=dti_max_bval)
    if selection.fallback_shell is not None:
        warnings.append(
            f"no diffusion-weighted volume with b <= {dti_max_bval:g} s/mm²; the tensor is fitted "
            f"on the lowest shell (b = {selection.fallback_shell:g} s/mm²)"
        )
    meanb0 = data_ras[..., selection.b0].mean(axis=-1)
    meandwi = data_ras[..., selection.dti].mean(axis=-1)

    if mask is None:
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        mask_ras = brain_mask(meanb0, float(np.mean(zooms)))
    else:
        if mask.shape != data.shape[:3]:
            raise InvalidInputError(
                f"mask shape {mask.shape} does not match the image grid {data.shape[:3]}"
            )
        mask_ras = reo.apply(np.asarray(mask) > 0)
    if not mask_ras.any():
        raise InvalidInputError("the brain mask is empty")

    fit_volumes = selection.b0 | selection.dti
    evals, evecs = fit_tensor(
        data_ras[..., fit_volumes], bvals[fit_volumes], g_ras[fit_volumes], mask_ras,
        b0_threshold=b0_threshold,
    )
    dwis = synthesize_dwis(meanb0, evals, evecs)
    dwis[~mask_ras] = 0.0
    maps_ras = np.concatenate([meanb0[..., None], meandwi[..., None], evals, dwis], axis=-1)
    for message in warnings:
        LOGGER.warning(message)
    return DiffusionMaps(
        maps=reo.undo(maps_ras.astype(np.float32)),
        mask=reo.undo(mask_ras),
        warnings=warnings,
    )
