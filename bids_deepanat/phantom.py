"""Digital brain phantom: a small, valid BIDS dataset with paired DWI and T1w per subject.

The phantom is built from the MNI ICBM152 2009a symmetric template shipped as package data
(T1 intensity and GM/WM probabilities; CSF is the brain mask minus GM and WM). Each subject gets
its own smooth anatomy (a random deformation of the template), its own tissue parameters and,
per scan, its own rigid head pose, so that DWI and T1w of one session are *not* aligned by their
headers alone; the true T1w-to-DWI world transform goes to ``sourcedata/phantom``.

Coordinate frames used throughout (all in mm, RAS+ world axes):

- *template*: MNI space of the package data.
- *anatomy*: the subject's head in a head-fixed frame; ``x_template = x_anat + u(x_anat)`` with a
  smooth displacement ``u`` (pull-back, so every output voxel can be sampled directly).
- *scanner*: world coordinates of one scan; ``y = pose @ x_anat`` with a rigid ``pose``.

The diffusion signal is a partial-volume sum of three compartments (CSF free water, isotropic
GM, axially symmetric WM tensor along a smooth fibre field) with a T2-like b=0 contrast and
Rician noise; b-vectors are written in the FSL/BIDS convention of the stored (non-RAS) image.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import as_file, files
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from bids_deepanat import __version__
from bids_deepanat.dmri import voxel_to_fsl_bvecs
from bids_deepanat.errors import UsageError

logger = logging.getLogger(__name__)

GENERATOR_NAME = "bids-deepanat-phantom"
TISSUES: tuple[str, ...] = ("csf", "gm", "wm")
#: Default gradient scheme: b=0 count and (b-value, number of directions) per shell.
DEFAULT_N_B0 = 6
DEFAULT_SHELLS: tuple[tuple[float, int], ...] = ((1000.0, 30), (2000.0, 30))
#: Free water at body temperature, µm²/ms; kept fixed so CSF is a known reference.
CSF_DIFFUSIVITY = 3.0

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_TEMPLATE_PACKAGE_DIR = ("data", "mni_icbm152_2009a")
# Brain extent of the template in MNI mm (from its mask); output fields of view are built on it.
_BRAIN_LO = np.array([-72.0, -107.0, -72.0])
_BRAIN_HI = np.array([72.0, 73.0, 82.0])
# Rotations act about the middle of the head, not about the MNI origin near the front.
_HEAD_CENTRE = (_BRAIN_LO + _BRAIN_HI) / 2.0


# --------------------------------------------------------------------------------------------
# Template
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Template:
    """Template maps on one regular grid: T1 intensity in [0, 1] and tissue fractions."""

    affine: np.ndarray
    t1: np.ndarray
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray

    @property
    def voxel_size(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def maps(self) -> dict[str, np.ndarray]:
        return {"t1": self.t1, "csf": self.csf, "gm": self.gm, "wm": self.wm}


def template_dir():
    """The package-data folder (a Traversable) that holds the MNI template and its NOTICE."""
    return files("bids_deepanat").joinpath(*_TEMPLATE_PACKAGE_DIR)


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the 1 mm MNI template once per process (phantoms are made many times in tests)."""
    folder = template_dir()
    arrays = {}
    affine = None
    for name in ("t1", "gm", "wm"):
        # as_file: a real path even when the package is installed zipped.
        with as_file(folder.joinpath(f"{name}.nii.gz")) as path:
            img = nib.load(path)
            arrays[name] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        affine = img.affine if affine is None else affine
    mask = (arrays["t1"] > 0).astype(np.float32)
    gm, wm = arrays["gm"] * mask, arrays["wm"] * mask
    # The probability maps are independent estimates; where they overlap by more than a voxel,
    # scale them down so that fractions stay a partition of the voxel.
    excess = np.maximum(gm + wm, 1.0)
    gm, wm = gm / excess, wm / excess
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    return Template(affine=np.asarray(affine, dtype=float), t1=arrays["t1"], csf=csf, gm=gm, wm=wm)


@functools.lru_cache(maxsize=6)
def template_for_voxel_size(voxel_size_mm: float) -> Template:
    """Template blurred to the point spread of ``voxel_size_mm`` voxels, on a coarser grid.

    Sampling the 1 mm maps once per output voxel would both alias (5 mm voxels would see 1 mm
    detail) and be slow. So: block-average to an integer step of about half the output voxel
    (cheap, and a box filter itself), then add the missing Gaussian blur on the small grid.
    """
    base = load_template()
    step = max(1, int(voxel_size_mm // 2))
    # Blur budget (FWHM², mm²): the template's own ~1 mm, the box average (FWHM ≈ 0.68 step).
    missing = voxel_size_mm**2 - 1.0 - (0.68 * step) ** 2 * (step > 1)
    sigma_vox = math.sqrt(max(missing, 0.0)) / _FWHM_PER_SIGMA / step
    maps = {}
    for name, arr in base.maps().items():
        arr = _block_average(arr, step)
        if sigma_vox > 0.2:
            arr = ndimage.gaussian_filter(arr, sigma_vox, mode="constant")
        maps[name] = arr.astype(np.float32, copy=False)
    # Block centres sit half a block minus half a voxel beyond the first voxel centre.
    affine = base.affine @ np.array(
        [
            [step, 0, 0, (step - 1) / 2],
            [0, step, 0, (step - 1) / 2],
            [0, 0, step, (step - 1) / 2],
            [0, 0, 0, 1.0],
        ]
    )
    return Template(affine=affine, **maps)


def _block_average(arr: np.ndarray, step: int) -> np.ndarray:
    if step == 1:
        return arr
    n = [s // step for s in arr.shape]
    cropped = arr[: n[0] * step, : n[1] * step, : n[2] * step]
    return cropped.reshape(n[0], step, n[1], step, n[2], step).mean(axis=(1, 3, 5))


# --------------------------------------------------------------------------------------------
# Fibre orientation field (template space)
# --------------------------------------------------------------------------------------------


def _smooth_window(x: np.ndarray, lo: float, hi: float, width: float) -> np.ndarray:
    """≈1 on [lo, hi], falling off smoothly (logistic) over ``width`` mm at both ends."""
    return 1.0 / ((1.0 + np.exp(-(x - lo) / width)) * (1.0 + np.exp((x - hi) / width)))


def base_fibre_field(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Coarse, anatomically inspired fibre directions at MNI points (arrays broadcast together).

    - left-right: corpus callosum and its radiation through the centrum semiovale, and the
      cerebellar white matter;
    - superior-inferior: corticospinal tract / corona radiata (internal capsule, cerebral
      peduncles, brainstem), fanning outward as it ascends; it wins where it crosses the
      callosal fibres;
    - anterior-posterior elsewhere (long association fibres, cingulum, temporal lobe).

    The region weights are smooth, so the blended field is smooth; its components are kept
    non-negative up to the outward tilt, so the blend never cancels.
    """
    x, y, z = np.broadcast_arrays(x, y, z)
    w_cc = (
        np.exp(-0.5 * (x / 24.0) ** 2)
        * _smooth_window(z, 5.0, 42.0, 4.0)
        * _smooth_window(y, -45.0, 35.0, 4.0)
    )
    w_cerebellum = _smooth_window(z, -80.0, -22.0, 4.0) * _smooth_window(y, -120.0, -50.0, 4.0)
    # Corticospinal centre line moves laterally as it ascends.
    x_cst = np.clip(10.0 + 0.3 * (z + 35.0), 8.0, 42.0)
    w_cst = (
        np.exp(-0.5 * ((np.abs(x) - x_cst) / 8.0) ** 2)
        * np.exp(-0.5 * ((y + 15.0) / 18.0) ** 2)
        * _smooth_window(z, -70.0, 55.0, 5.0)
    )
    w_stem = (
        _smooth_window(np.abs(x), -1.0, 12.0, 2.0)
        * _smooth_window(z, -80.0, -22.0, 4.0)
        * _smooth_window(y, -50.0, -10.0, 4.0)
    )
    w_si = np.maximum(w_cst, w_stem)
    w_lr = np.maximum(w_cc, w_cerebellum) * (1.0 - w_si)
    w_ap = 1.0 - w_si - w_lr
    outward = 0.3 * np.tanh(x / 5.0) * _smooth_window(z, -25.0, 200.0, 5.0)
    v = np.stack([w_lr + outward * w_cst, w_ap + 0.02, w_si], axis=-1)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def fibre_field(wm: np.ndarray, affine: np.ndarray, *, smoothing_mm: float = 2.5) -> np.ndarray:
    """Unit fibre directions (X, Y, Z, 3) on the grid of ``wm`` (zeros outside white matter).

    The base field is projected onto the tangent plane of the smoothed WM probability where
    its gradient is strong: near the WM surface, fibres run along it, as in gyral WM.
    """
    step = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    wm_s = ndimage.gaussian_filter(wm.astype(np.float64), smoothing_mm / step)
    grad = np.stack(np.gradient(wm_s, *step), axis=-1)  # per mm, axis-aligned grid
    axes = [affine[d, d] * np.arange(n) + affine[d, 3] for d, n in enumerate(wm.shape)]
    v = base_fibre_field(axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])

    strength = np.linalg.norm(grad, axis=-1, keepdims=True)
    normal = grad / np.maximum(strength, 1e-12)
    # Full projection where WM ends over ~4 mm (|∇p| ≈ 0.25/mm), none in deep WM.
    alpha = np.clip(strength / 0.15, 0.0, 1.0)
    proj = v - alpha * np.sum(v * normal, axis=-1, keepdims=True) * normal
    norm = np.linalg.norm(proj, axis=-1, keepdims=True)
    # Where the base direction is normal to the surface, any tangent will do: take the one
    # closest to anterior-posterior (or left-right when the normal itself is A-P).
    fallback_axis = np.where(np.abs(normal[..., 1:2]) > 0.9, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    fallback = fallback_axis - np.sum(fallback_axis * normal, axis=-1, keepdims=True) * normal
    proj = np.where(norm < 0.2, fallback, proj)
    proj /= np.maximum(np.linalg.norm(proj, axis=-1, keepdims=True), 1e-12)
    proj[wm_s < 0.02] = 0.0
    return proj.astype(np.float32)


@functools.lru_cache(maxsize=1)
def template_fibre_dyadics() -> tuple[np.ndarray, np.ndarray]:
    """Fibre field of the template as dyadics ``d dᵀ`` (6 unique components, first axis).

    Directions have no sign; interpolating the dyadic instead of the vector keeps neighbours
    that point in opposite senses from cancelling. The field is smooth, so a 2 mm grid is enough.
    """
    tpl = template_for_voxel_size(4.0)
    d = fibre_field(tpl.wm, tpl.affine)
    pairs = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
    dyad = np.stack([d[..., a] * d[..., b] for a, b in pairs]).astype(np.float32)
    return tpl.affine, dyad


def _principal_from_dyadics(six: np.ndarray) -> np.ndarray:
    """(N, 6) dyadic components -> (N, 3) principal eigenvectors."""
    m = np.empty((six.shape[0], 3, 3))
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = six[:, 0], six[:, 1], six[:, 2]
    m[:, 0, 1] = m[:, 1, 0] = six[:, 3]
    m[:, 0, 2] = m[:, 2, 0] = six[:, 4]
    m[:, 1, 2] = m[:, 2, 1] = six[:, 5]
    return np.linalg.eigh(m)[1][:, :, -1]


# --------------------------------------------------------------------------------------------
# Subject anatomy and head pose
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Deformation:
    """Smooth displacement field ``u`` (3, X, Y, Z) in mm on a regular anatomy-space grid."""

    affine: np.ndarray
    field: np.ndarray

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """``u`` at anatomy points (3, ...) -> (3, ...)."""
        inv = np.linalg.inv(self.affine)
        vox = np.tensordot(inv[:3, :3], points, axes=1) + inv[:3, 3].reshape(
            3, *[1] * (points.ndim - 1)
        )
        return np.stack(
            [ndimage.map_coordinates(c, vox, order=1, mode="nearest") for c in self.field]
        )


def random_deformation(
    rng: np.random.Generator,
    *,
    amplitude_mm: float = 2.0,
    correlation_mm: float = 25.0,
    grid_spacing_mm: float = 4.0,
) -> Deformation:
    """A random smooth deformation: white noise on a coarse (4 mm) grid, Gaussian-smoothed and
    scaled to an RMS of ``amplitude_mm`` per component; voxels interpolate it linearly.

    Displacements of a few mm varying over ~25 mm keep the map one-to-one with local volume
    changes within about ±30 %, like normal anatomical variability rather than pathology.
    """
    lo, hi = _BRAIN_LO - 40.0, _BRAIN_HI + 40.0
    shape = tuple(int(n) for n in np.ceil((hi - lo) / grid_spacing_mm).astype(int) + 1)
    noise = rng.standard_normal((3, *shape))
    # Periodic boundaries keep the variance the same everywhere (reflection would inflate it).
    sigma = correlation_mm / grid_spacing_mm
    smooth = np.stack([ndimage.gaussian_filter(c, sigma, mode="wrap") for c in noise])
    smooth *= amplitude_mm / np.sqrt(np.mean(smooth**2))
    affine = np.diag([grid_spacing_mm] * 3 + [1.0])
    affine[:3, 3] = lo
    return Deformation(affine=affine, field=smooth.astype(np.float32))


def rotation_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (right-handed, radians)."""
    ax, ay, az = angles_rad
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid_matrix(angles_rad: Sequence[float], translation_mm: Sequence[float]) -> np.ndarray:
    """4x4 rigid transform rotating about the head centre, then translating."""
    rot = rotation_matrix(angles_rad)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = _HEAD_CENTRE - rot @ _HEAD_CENTRE + np.asarray(translation_mm, dtype=float)
    return out


def random_rigid(
    rng: np.random.Generator, rotation_deg: float, translation_mm: float
) -> np.ndarray:
    """Random head pose; draws are clipped at 2 SD so the brain stays inside the field of view."""
    angles = np.deg2rad(np.clip(rng.normal(0.0, 1.0, 3), -2, 2) * rotation_deg)
    shift = np.clip(rng.normal(0.0, 1.0, 3), -2, 2) * translation_mm
    return rigid_matrix(angles, shift)


# --------------------------------------------------------------------------------------------
# Grids and sampling
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """An axis-aligned RAS+ voxel grid in scanner space."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def covering(cls, lo: np.ndarray, hi: np.ndarray, voxel_size_mm: float) -> Grid:
        shape = tuple(int(s) for s in np.ceil((hi - lo) / voxel_size_mm).astype(int) + 1)
        affine = np.diag([voxel_size_mm] * 3 + [1.0])
        # Centre the grid on the requested box so rounding spreads evenly on both sides.
        extent = (np.array(shape) - 1) * voxel_size_mm
        affine[:3, 3] = (lo + hi) / 2.0 - extent / 2.0
        return cls(shape=shape, affine=affine)

    def axes(self) -> list[np.ndarray]:
        """World coordinate of the voxel centres along each axis (the grid is axis-aligned)."""
        return [
            self.affine[d, d] * np.arange(n) + self.affine[d, 3] for d, n in enumerate(self.shape)
        ]


def scanner_to_template(grid: Grid, pose: np.ndarray, deformation: Deformation) -> np.ndarray:
    """Template coordinates (3, X, Y, Z) seen by each voxel of a scan taken with head ``pose``."""
    inv = np.linalg.inv(pose)
    ax = grid.axes()
    # Broadcasting the axis-aligned grid avoids materialising 3 index arrays first.
    anat = np.stack(
        [
            inv[c, 0] * ax[0][:, None, None]
            + inv[c, 1] * ax[1][None, :, None]
            + inv[c, 2] * ax[2][None, None, :]
            + inv[c, 3]
            for c in range(3)
        ]
    )
    return anat + deformation.displacement(anat)


def sample(
    volume: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int = 1
) -> np.ndarray:
    """Values of ``volume`` (with ``affine``) at world points (3, ...); zero outside."""
    inv = np.linalg.inv(affine)
    vox = np.tensordot(inv[:3, :3], points, axes=1) + inv[:3, 3].reshape(
        3, *[1] * (points.ndim - 1)
    )
    return ndimage.map_coordinates(volume, vox, order=order, mode="constant", cval=0.0)


def random_bias_field(rng: np.random.Generator, grid: Grid, strength: float = 0.08) -> np.ndarray:
    """Mild smooth multiplicative bias (receive-coil shading): exp of a random quadratic."""
    ax = [(a - c) / 80.0 for a, c in zip(grid.axes(), _HEAD_CENTRE)]
    x, y, z = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]
    terms = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    coef = rng.normal(0.0, strength, len(terms))
    log_bias = sum(c * t for c, t in zip(coef, terms))
    return np.exp(np.broadcast_to(log_bias, grid.shape)).astype(np.float32)


def reorient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store RAS+ ``data`` with voxel axes ``axcodes`` (e.g. "LAS"); returns (data, affine)."""
    start = nio.io_orientation(affine)
    end = nio.axcodes2ornt(tuple(axcodes.upper()))
    transform = nio.ornt_transform(start, end)
    new = nio.apply_orientation(data, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, data.shape[:3])
    return np.ascontiguousarray(new), new_affine


def _validate_axcodes(axcodes: str) -> str:
    codes = axcodes.upper()
    try:
        ornt = nio.axcodes2ornt(tuple(codes))
    except Exception as exc:  # nibabel raises ValueError or KeyError depending on the fault
        raise ValueError(f"invalid orientation code {axcodes!r}") from exc
    if len(codes) != 3 or np.isnan(ornt).any() or len(set(ornt[:, 0])) != 3:
        raise ValueError(f"invalid orientation code {axcodes!r}: need one of L/R, A/P, S/I each")
    return codes


def rotation_part(affine: np.ndarray) -> np.ndarray:
    """Columns of ``affine[:3, :3]`` normalised: voxel-axis unit vectors in world space."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    return m / np.linalg.norm(m, axis=0)


# --------------------------------------------------------------------------------------------
# Gradient scheme
# --------------------------------------------------------------------------------------------


def fibonacci_hemisphere(n: int) -> np.ndarray:
    """``n`` well-spread unit vectors on the upper hemisphere (antipodal symmetry of DWI)."""
    k = np.arange(n) + 0.5
    z = 1.0 - k / n
    r = np.sqrt(1.0 - z * z)
    phi = k * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def default_bvals(
    n_b0: int = DEFAULT_N_B0, shells: Iterable[tuple[float, int]] = DEFAULT_SHELLS
) -> np.ndarray:
    """b-values per volume: one b=0 first, the others spread evenly between the DW volumes."""
    dw = [float(b) for b, n in shells for _ in range(n)]
    # Insert a b=0 before DW volume slots[j]; any that do not fit go at the end.
    slots = [round(i * len(dw) / n_b0) for i in range(n_b0)]
    out: list[float] = []
    j = 0
    for i, b in enumerate(dw):
        while j < len(slots) and slots[j] == i:
            out.append(0.0)
            j += 1
        out.append(b)
    out.extend([0.0] * (len(slots) - j))
    return np.asarray(out)


def gradient_directions(bvals: Sequence[float]) -> np.ndarray:
    """Unit gradient directions (N, 3) in scanner world space for per-volume ``bvals``.

    Each shell gets a Fibonacci hemisphere, turned by a shell-specific rotation so that the
    shells sample complementary directions; b=0 volumes get zero vectors.
    """
    bvals = np.asarray(bvals, dtype=float)
    g = np.zeros((bvals.size, 3))
    for s, b in enumerate(np.unique(bvals[bvals > 0])):
        idx = np.flatnonzero(bvals == b)
        golden = math.pi * (3.0 - math.sqrt(5.0))
        rot = rotation_matrix([0.3 + 0.7 * s, 0.2 + golden * s, 0.1 + 1.1 * s])
        g[idx] = fibonacci_hemisphere(idx.size) @ rot.T
    return g


def world_to_fsl_bvecs(g_world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World-space gradient directions -> FSL/BIDS b-vectors of an image stored with ``affine``."""
    g_vox = np.asarray(g_world, dtype=float) @ rotation_part(affine)  # rows: Rᵀ g
    return voxel_to_fsl_bvecs(g_vox, affine)


# --------------------------------------------------------------------------------------------
# Tissue parameters and signal models
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TissueParameters:
    """Per-subject MR properties. Diffusivities in µm²/ms, S0 relative to CSF."""

    s0: dict[str, float]
    d_csf: float
    d_gm: float
    wm_axial: float
    wm_radial: float
    dwi_scale: float
    t1_scale: float
    t1_contrast: dict[str, float]

    def to_json(self) -> dict:
        return {
            "S0Relative": self.s0,
            "DiffusivityCSF_um2_per_ms": self.d_csf,
            "DiffusivityGM_um2_per_ms": self.d_gm,
            "WMAxialDiffusivity_um2_per_ms": self.wm_axial,
            "WMRadialDiffusivity_um2_per_ms": self.wm_radial,
            "DWIScale": self.dwi_scale,
            "T1wScale": self.t1_scale,
            "T1wContrastJitter": self.t1_contrast,
        }


def random_tissue_parameters(rng: np.random.Generator) -> TissueParameters:
    """Plausible adult-brain values with modest between-subject variation."""
    return TissueParameters(
        # T2-like b=0 contrast at TE ≈ 80 ms: CSF > GM > WM.
        s0={"csf": 1.0, "gm": float(rng.uniform(0.55, 0.65)), "wm": float(rng.uniform(0.40, 0.48))},
        d_csf=CSF_DIFFUSIVITY,
        d_gm=float(rng.uniform(0.75, 0.85)),
        wm_axial=float(rng.uniform(1.6, 1.8)),
        wm_radial=float(rng.uniform(0.30, 0.40)),
        dwi_scale=float(rng.uniform(800.0, 1200.0)),
        t1_scale=float(rng.uniform(800.0, 1200.0)),
        t1_contrast={t: float(rng.normal(0.0, 0.05)) for t in TISSUES},
    )


def dwi_signal(
    fractions: np.ndarray,
    fibres: np.ndarray,
    s0: np.ndarray,
    params: TissueParameters,
    bvals: np.ndarray,
    g_world: np.ndarray,
) -> np.ndarray:
    """Noise-free signal (N_vox, N_vol) of the three-compartment partial-volume model.

    ``fractions`` (N_vox, 3) in TISSUES order, ``fibres`` (N_vox, 3) unit vectors in world space,
    ``s0`` (N_vox,) overall scale (incl. bias field), b in s/mm², so D in mm²/s = µm²/ms * 1e-3.
    """
    b = np.asarray(bvals, dtype=np.float64)[None, :]
    um2ms = 1e-3
    iso_csf = np.exp(-b * params.d_csf * um2ms)
    iso_gm = np.exp(-b * params.d_gm * um2ms)
    # gᵀDg for D = λ⊥ I + (λ∥ - λ⊥) d dᵀ.
    cos2 = (fibres @ np.asarray(g_world, dtype=np.float64).T) ** 2
    adc_wm = params.wm_radial + (params.wm_axial - params.wm_radial) * cos2
    wm = np.exp(-b * adc_wm * um2ms)
    sig = (
        fractions[:, 0:1] * params.s0["csf"] * iso_csf
        + fractions[:, 1:2] * params.s0["gm"] * iso_gm
        + fractions[:, 2:3] * params.s0["wm"] * wm
    )
    return (s0[:, None] * sig).astype(np.float32)


def add_rician_noise(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation ``sigma``."""
    # In place: full-resolution DWI are large, and temporaries cost more than the arithmetic.
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= sigma
    real += signal
    imag = rng.standard_normal(signal.shape, dtype=np.float32)
    imag *= sigma
    return np.hypot(real, imag, out=real)


def push_forward_directions(
    template_coords: np.ndarray, grid: Grid, dirs_template: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Map template-space directions at ``mask`` voxels to scanner world.

    Fibres move with the tissue: a tangent ``d_t`` at the template point seen by a voxel is
    carried to ``(∂x_t/∂y)⁻¹ d_t`` in scanner space; this includes the head rotation and the
    local shear of the deformation.
    """
    step = np.diag(grid.affine)[:3]
    jac = np.empty((int(mask.sum()), 3, 3))
    for a in range(3):
        grads = np.gradient(template_coords[a], *step)  # ∂x_t[a]/∂y[b], grid is axis-aligned
        for b in range(3):
            jac[:, a, b] = grads[b][mask]
    d = np.linalg.solve(jac, dirs_template[..., None])[..., 0]
    return d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------
# One subject
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """Everything that shapes a phantom besides the subject and session indices."""

    voxel_size_mm: float = 2.0
    snr: float | None = 30.0
    t1w_snr: float | None = 40.0
    seed: int = 0
    bvals: tuple[float, ...] = dataclasses.field(default_factory=lambda: tuple(default_bvals()))
    dwi_orientation: str = "LAS"
    t1w_orientation: str = "RAS"
    t1w_voxel_size_mm: float | None = None
    bias_field: bool = True
    deformation_mm: float = 2.0
    pose_rotation_deg: float = 2.0
    pose_translation_mm: float = 3.0
    motion_rotation_deg: float = 1.0
    motion_translation_mm: float = 1.0

    @property
    def t1w_voxel(self) -> float:
        if self.t1w_voxel_size_mm is not None:
            return float(self.t1w_voxel_size_mm)
        return max(1.0, self.voxel_size_mm / 2.0)


@dataclasses.dataclass(frozen=True, eq=False)
class DwiTruth:
    """Ground truth of one DWI scan, on its stored grid (same voxel order as the image).

    ``fractions``: (X, Y, Z, 3) CSF/GM/WM volume fractions (TISSUES order).
    ``fibre_world``: (X, Y, Z, 3) unit WM fibre direction in scanner world, zero without WM.
    """

    affine: np.ndarray
    fractions: np.ndarray
    fibre_world: np.ndarray
    s0: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class SessionPhantom:
    """Images and truth of one session of one subject."""

    subject: str
    session: str | None
    dwi: nib.Nifti1Image
    bvals: np.ndarray
    bvecs: np.ndarray  # (N, 3) FSL/BIDS convention for ``dwi`` as stored
    t1w: nib.Nifti1Image | None
    t1w_pose: np.ndarray
    dwi_pose: np.ndarray
    truth: DwiTruth
    params: TissueParameters

    @property
    def t1w_to_dwi_world(self) -> np.ndarray:
        """Maps a point given in T1w-scan world coordinates to the same tissue in DWI world."""
        return self.dwi_pose @ np.linalg.inv(self.t1w_pose)


def _rng(seed: int, *key: int) -> np.random.Generator:
    # One independent stream per (subject, session, purpose): dropping a T1w or adding
    # subjects does not change what the other scans look like.
    return np.random.default_rng([seed, *key])


_PURPOSE_ANATOMY, _PURPOSE_POSE, _PURPOSE_T1W, _PURPOSE_DWI = range(4)


def simulate_dwi(
    config: PhantomConfig,
    pose: np.ndarray,
    deformation: Deformation,
    params: TissueParameters,
    rng: np.random.Generator,
) -> tuple[nib.Nifti1Image, np.ndarray, DwiTruth]:
    """DWI image, FSL b-vectors and truth for one scan (head ``pose``, anatomy ``deformation``)."""
    # The margin covers the worst head pose and deformation (clipped at 2 SD) with room to spare.
    grid = Grid.covering(_BRAIN_LO - 15.0, _BRAIN_HI + 15.0, config.voxel_size_mm)
    tpl = template_for_voxel_size(config.voxel_size_mm)
    coords = scanner_to_template(grid, pose, deformation)
    fractions = np.stack([sample(getattr(tpl, t), tpl.affine, coords) for t in TISSUES], axis=-1)
    fractions = np.clip(fractions, 0.0, 1.0)
    brain = fractions.sum(axis=-1) > 1e-3
    wm = brain & (fractions[..., 2] > 1e-3)

    dyad_affine, dyadics = template_fibre_dyadics()
    pts = coords[:, wm]
    six = np.stack([sample(c, dyad_affine, pts) for c in dyadics], axis=-1)
    dirs_template = _principal_from_dyadics(six)
    fibres = np.zeros((*grid.shape, 3), dtype=np.float32)
    fibres[wm] = push_forward_directions(coords, grid, dirs_template, wm)

    s0 = np.full(grid.shape, params.dwi_scale, dtype=np.float32)
    if config.bias_field:
        s0 *= random_bias_field(rng, grid)
    bvals = np.asarray(config.bvals, dtype=float)
    g_world = gradient_directions(bvals)
    data = np.zeros((*grid.shape, bvals.size), dtype=np.float32)
    data[brain] = dwi_signal(fractions[brain], fibres[brain], s0[brain], params, bvals, g_world)
    if config.snr is not None and np.isfinite(config.snr):
        b0 = data[..., bvals == 0].mean(axis=-1) if np.any(bvals == 0) else data[..., 0]
        sigma = float(b0[fractions.sum(axis=-1) > 0.5].mean()) / float(config.snr)
        data = add_rician_noise(rng, data, sigma)

    # Reorient everything that lives on the grid the same way, so truth indexes like the image.
    data, affine = reorient(data, grid.affine, config.dwi_orientation)
    fractions, _ = reorient(fractions.astype(np.float32), grid.affine, config.dwi_orientation)
    fibres, _ = reorient(fibres, grid.affine, config.dwi_orientation)
    s0_stored, _ = reorient(s0, grid.affine, config.dwi_orientation)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((*img.header.get_zooms()[:3], _DWI_SIDECAR["RepetitionTime"]))
    img.header.set_data_dtype(np.int16)  # scanner-like storage; nibabel picks scl_slope
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    bvecs = world_to_fsl_bvecs(g_world, affine)
    truth = DwiTruth(affine=affine, fractions=fractions, fibre_world=fibres, s0=s0_stored)
    return img, bvecs, truth


def simulate_t1w(
    config: PhantomConfig,
    pose: np.ndarray,
    deformation: Deformation,
    params: TissueParameters,
    rng: np.random.Generator,
) -> nib.Nifti1Image:
    """T1w image of one scan: deformed, posed MNI T1 with contrast jitter, bias and noise."""
    voxel = config.t1w_voxel
    # Real T1w fields of view are larger than the DWI slab and reach down to the neck.
    lo = _BRAIN_LO - np.array([15.0, 15.0, 25.0])
    hi = _BRAIN_HI + np.array([15.0, 15.0, 10.0])
    grid = Grid.covering(lo, hi, voxel)
    tpl = template_for_voxel_size(voxel)
    coords = scanner_to_template(grid, pose, deformation)
    # Contrast jitter: each tissue's share of the intensity is scaled a little differently.
    # Applied on the template grid so that the scan needs one interpolation, not four.
    gain = 1.0 + sum(params.t1_contrast[t] * getattr(tpl, t) for t in TISSUES)
    t1 = sample(tpl.t1 * gain.astype(np.float32), tpl.affine, coords)
    data = (params.t1_scale * t1).astype(np.float32)
    if config.bias_field:
        data *= random_bias_field(rng, grid)
    if config.t1w_snr is not None and np.isfinite(config.t1w_snr):
        sigma = float(data[t1 > 0.3].mean()) / float(config.t1w_snr)  # mean brain intensity
        data = add_rician_noise(rng, data, sigma)
    data, affine = reorient(data, grid.affine, config.t1w_orientation)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(np.int16)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


def subject_label(index: int) -> str:
    """Zero-based subject index -> BIDS label "01", "02", ..."""
    return f"{index + 1:02d}"


def simulate_subject(
    index: int,
    config: PhantomConfig,
    *,
    sessions: int = 0,
    with_t1w: bool = True,
) -> list[SessionPhantom]:
    """All scans of subject ``index`` (zero-based); one entry per session (one if sessions=0).

    Deterministic in (config.seed, index, session): the anatomy and tissue parameters are per
    subject, head poses, bias fields and noise per scan.
    """
    anat_rng = _rng(config.seed, index, 0, _PURPOSE_ANATOMY)
    params = random_tissue_parameters(anat_rng)
    deformation = random_deformation(anat_rng, amplitude_mm=config.deformation_mm)
    label = subject_label(index)
    out = []
    for ses in range(max(sessions, 1)):
        key = (config.seed, index, ses + 1)
        pose_rng = _rng(*key, _PURPOSE_POSE)
        t1w_pose = random_rigid(pose_rng, config.pose_rotation_deg, config.pose_translation_mm)
        motion = random_rigid(pose_rng, config.motion_rotation_deg, config.motion_translation_mm)
        dwi_pose = motion @ t1w_pose
        dwi, bvecs, truth = simulate_dwi(
            config, dwi_pose, deformation, params, _rng(*key, _PURPOSE_DWI)
        )
        t1w = (
            simulate_t1w(config, t1w_pose, deformation, params, _rng(*key, _PURPOSE_T1W))
            if with_t1w
            else None
        )
        out.append(
            SessionPhantom(
                subject=label,
                session=str(ses + 1) if sessions > 0 else None,
                dwi=dwi,
                bvals=np.asarray(config.bvals, dtype=float),
                bvecs=bvecs,
                t1w=t1w,
                t1w_pose=t1w_pose,
                dwi_pose=dwi_pose,
                truth=truth,
                params=params,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Writing the BIDS dataset
# --------------------------------------------------------------------------------------------

_T1W_SIDECAR = {
    "Modality": "MR",
    "MagneticFieldStrength": 3,
    "Manufacturer": "bids-deepanat digital phantom",
    "ManufacturersModelName": GENERATOR_NAME,
    "MRAcquisitionType": "3D",
    "PulseSequenceType": "MPRAGE",
    "ScanningSequence": "GR\\IR",
    "RepetitionTime": 2.3,
    "EchoTime": 0.00298,
    "InversionTime": 0.9,
    "FlipAngle": 9,
}

_DWI_SIDECAR = {
    "Modality": "MR",
    "MagneticFieldStrength": 3,
    "Manufacturer": "bids-deepanat digital phantom",
    "ManufacturersModelName": GENERATOR_NAME,
    "MRAcquisitionType": "2D",
    "PulseSequenceType": "Spin-echo EPI, monopolar diffusion encoding",
    "ScanningSequence": "EP",
    "RepetitionTime": 3.5,
    "EchoTime": 0.08,
    "FlipAngle": 90,
    "PhaseEncodingDirection": "j-",
    "TotalReadoutTime": 0.05,
    "SliceEncodingDirection": "k",
}

_PHANTOM_NOTE = (
    "Digital phantom synthesized by bids-deepanat-phantom from the MNI ICBM152 2009a template; "
    "not acquired on a scanner. Acquisition fields are nominal."
)


def _write_json(path: Path, obj: Mapping) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _notice_text() -> str:
    return template_dir().joinpath("NOTICE.txt").read_text()


def _bids_prefix(subject: str, session: str | None) -> tuple[Path, str]:
    folder = Path(f"sub-{subject}") / (f"ses-{session}" if session else "")
    stem = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    return folder, stem


def write_session(root: Path, ses: SessionPhantom, config: PhantomConfig, sessions: int) -> None:
    """Write the images, sidecars, gradient files and truth JSON of one session.

    The truth JSON also records ``config`` and ``sessions``, which is all that
    :func:`ground_truth` needs to recompute the truth maps.
    """
    folder, stem = _bids_prefix(ses.subject, ses.session)
    dwi_dir = root / folder / "dwi"
    dwi_dir.mkdir(parents=True, exist_ok=True)
    nib.save(ses.dwi, dwi_dir / f"{stem}_dwi.nii.gz")
    # dcm2niix layout: one row of b-values; three rows (x, y, z) of b-vectors.
    bval_txt = " ".join(f"{b:g}" for b in ses.bvals) + "\n"
    (dwi_dir / f"{stem}_dwi.bval").write_text(bval_txt)
    bvecs = np.where(np.abs(ses.bvecs) < 5e-7, 0.0, ses.bvecs)  # no "-0.000000"
    (dwi_dir / f"{stem}_dwi.bvec").write_text(
        "\n".join(" ".join(f"{v:.6f}" if v else "0" for v in row) for row in bvecs.T) + "\n"
    )
    _write_json(dwi_dir / f"{stem}_dwi.json", {**_DWI_SIDECAR, "ImageComments": _PHANTOM_NOTE})
    if ses.t1w is not None:
        anat_dir = root / folder / "anat"
        anat_dir.mkdir(parents=True, exist_ok=True)
        nib.save(ses.t1w, anat_dir / f"{stem}_T1w.nii.gz")
        _write_json(anat_dir / f"{stem}_T1w.json", {**_T1W_SIDECAR, "ImageComments": _PHANTOM_NOTE})

    truth_dir = root / "sourcedata" / "phantom"
    truth_dir.mkdir(parents=True, exist_ok=True)
    truth = {
        "Description": (
            "Ground truth of the phantom. T1wToDwiWorld is a 4x4 matrix M (row-major) acting on "
            "homogeneous column vectors: for a point of the head at world (scanner RAS+, mm) "
            "coordinates p in the T1w image, M @ p gives its world coordinates in the DWI image. "
            "Poses map head-fixed anatomy coordinates (MNI-like, before the per-subject smooth "
            "deformation) to each scan's world coordinates; T1wToDwiWorld = DwiPose @ inv(T1wPose)."
        ),
        "T1wToDwiWorld": ses.t1w_to_dwi_world.tolist(),
        "T1wPose": ses.t1w_pose.tolist(),
        "DwiPose": ses.dwi_pose.tolist(),
        "T1wPresent": ses.t1w is not None,
        "Seed": config.seed,
        "TissueParameters": ses.params.to_json(),
        "PhantomConfig": dataclasses.asdict(config),
        "Sessions": sessions,
        "GeneratorVersion": __version__,
    }
    _write_json(truth_dir / f"{stem}_truth.json", truth)


def _write_dataset_files(root: Path, subjects: Sequence[str], config: PhantomConfig) -> None:
    _write_json(
        root / "dataset_description.json",
        {
            "Name": "bids-deepanat digital brain phantom",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": (
                "Derived from the MNI ICBM152 2009a template; redistributed under its notice "
                "(see LICENSE)"
            ),
            "Authors": ["bids-deepanat developers"],
            "GeneratedBy": [
                {
                    "Name": GENERATOR_NAME,
                    "Version": __version__,
                    "Description": "Synthetic DWI and T1w from the MNI ICBM152 2009a template",
                }
            ],
            "SourceDatasets": [
                {"URL": "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/"}
            ],
            "ReferencesAndLinks": [
                "Fonov et al., NeuroImage 54(1) 2011",
                "Fonov et al., NeuroImage 47 S102 2009",
            ],
        },
    )
    (root / "LICENSE").write_text(_notice_text())
    bvals = np.asarray(config.bvals)
    shells = ", ".join(f"{int((bvals == b).sum())} at b={b:g}" for b in np.unique(bvals))
    (root / "README").write_text(
        "bids-deepanat digital brain phantom\n"
        "===================================\n\n"
        f"{_PHANTOM_NOTE}\n\n"
        f"Subjects: {len(subjects)}. Seed: {config.seed}. "
        f"DWI voxel size: {config.voxel_size_mm:g} mm ({config.dwi_orientation} storage), "
        f"T1w voxel size: {config.t1w_voxel:g} mm.\n"
        f"DWI volumes: {shells} s/mm2. SNR (mean b=0 brain signal / noise SD): {config.snr}.\n"
        "Each subject has a smooth random deformation of the template and a random head pose per\n"
        "scan, so DWI and T1w are not aligned by their headers; the true transform between them\n"
        "is in sourcedata/phantom/*_truth.json.\n\n"
        "The MNI template is distributed under the following notice (also in LICENSE):\n\n"
        + _notice_text()
    )
    _write_json(
        root / "participants.json",
        {
            "participant_id": {"Description": "Phantom subject label"},
            "age": {"Description": "Nominal age (phantom; not meaningful)", "Units": "year"},
            "sex": {
                "Description": "Nominal sex (phantom; not meaningful)",
                "Levels": {"M": "male", "F": "female"},
            },
        },
    )
    rows = ["participant_id\tage\tsex"]
    for label in subjects:
        rng = _rng(config.seed, int(label) - 1, 0, 99)
        rows.append(f"sub-{label}\t{int(rng.integers(20, 70))}\t{rng.choice(['M', 'F'])}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")


def _finite_or_none(value: float | None) -> float | None:
    # "No noise" has one spelling in the config (and JSON has no infinity).
    return None if value is None or not np.isfinite(value) else float(value)


def ground_truth(
    dataset: str | Path, subject: str, session: str | None = None, *, with_t1w: bool = False
) -> SessionPhantom:
    """Recompute one session of a phantom written by :func:`make_phantom_dataset`.

    Uses the configuration recorded in ``sourcedata/phantom``; the simulation is deterministic,
    so the returned images equal the written ones and ``.truth`` holds the maps behind them
    (tissue fractions, fibre directions in world space) on the stored DWI grid.
    """
    label = next(iter(_normalise_labels([subject])))
    ses_label = None if session is None else str(session).removeprefix("ses-")
    _, stem = _bids_prefix(label, ses_label)
    record = json.loads(
        (Path(dataset) / "sourcedata" / "phantom" / f"{stem}_truth.json").read_text()
    )
    fields = dict(record["PhantomConfig"])
    fields["bvals"] = tuple(fields["bvals"])
    config = PhantomConfig(**fields)
    scans = simulate_subject(int(label) - 1, config, sessions=record["Sessions"], with_t1w=with_t1w)
    return scans[0 if ses_label is None else int(ses_label) - 1]


def _normalise_labels(labels: Iterable[str]) -> set[str]:
    out = set()
    for label in labels:
        text = str(label).removeprefix("sub-")
        out.add(f"{int(text):02d}" if text.isdigit() else text)
    return out


def _prepare_output(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty (use overwrite to replace a phantom)")
        # Only ever delete what this tool made before: never a user's unrelated folder.
        try:
            desc = json.loads((root / "dataset_description.json").read_text())
            ours = desc["GeneratedBy"][0]["Name"] == GENERATOR_NAME
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            ours = False
        if not ours:
            raise FileExistsError(f"{root} is not empty and is not a phantom made by this tool")
        logger.info("Removing the previous phantom in %s", root)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)


def make_phantom_dataset(
    output_dir: str | Path,
    *,
    n_subjects: int = 2,
    voxel_size_mm: float = 2.0,
    snr: float | None = 30.0,
    seed: int = 0,
    sessions: int = 0,
    without_t1w: Iterable[str] = (),
    bvals: Sequence[float] | None = None,
    dwi_orientation: str = "LAS",
    t1w_voxel_size_mm: float | None = None,
    t1w_snr: float | None = 40.0,
    bias_field: bool = True,
    deformation_mm: float = 2.0,
    overwrite: bool = False,
) -> Path:
    """Write a BIDS 1.9 raw dataset of digital brain phantoms and return its root.

    Args:
        output_dir: dataset root; must be absent or empty (or a previous phantom with overwrite).
        n_subjects: subjects sub-01, sub-02, ...
        voxel_size_mm: isotropic DWI voxel size; 4-6 mm gives a tiny, fast dataset.
        snr: mean b=0 brain signal over the noise SD; None (or inf) for noise-free DWI.
        seed: everything is a deterministic function of seed, subject and session.
        sessions: 0 for no session level, K > 0 for ses-1 .. ses-K, each with its own scans.
        without_t1w: subject labels ("01" or "sub-01") whose T1w is left out.
        bvals: b-value (s/mm²) of every DWI volume; default 6 b=0 + 30 b=1000 + 30 b=2000.
        dwi_orientation: voxel axis codes of the stored DWI, e.g. "LAS" (default), "LPS", "RAS".
        t1w_voxel_size_mm: T1w voxel size; default half the DWI voxel size, at least 1 mm.
        t1w_snr: mean T1w brain intensity over the noise SD; None for noise-free.
        bias_field: multiply each scan by a mild smooth random bias field.
        deformation_mm: SD of the random displacements that make each subject's anatomy.
        overwrite: replace ``output_dir`` if it holds a phantom made by this tool before.
    """
    if n_subjects < 1:
        raise ValueError("n_subjects must be at least 1")
    if sessions < 0:
        raise ValueError("sessions must be >= 0")
    if voxel_size_mm <= 0:
        raise ValueError("voxel_size_mm must be positive")
    if snr is not None and snr <= 0:
        raise ValueError("snr must be positive (None or inf for no noise)")
    bvals_t = tuple(float(b) for b in (default_bvals() if bvals is None else bvals))
    if not bvals_t or min(bvals_t) < 0:
        raise ValueError("bvals must be a non-empty list of non-negative b-values")
    subjects = [subject_label(i) for i in range(n_subjects)]
    no_t1w = _normalise_labels(without_t1w)
    unknown = no_t1w - set(subjects)
    if unknown:
        raise ValueError(f"--without-t1w names unknown subjects: {sorted(unknown)}")
    config = PhantomConfig(
        voxel_size_mm=float(voxel_size_mm),
        snr=_finite_or_none(snr),
        t1w_snr=_finite_or_none(t1w_snr),
        seed=int(seed),
        bvals=bvals_t,
        dwi_orientation=_validate_axcodes(dwi_orientation),
        t1w_voxel_size_mm=t1w_voxel_size_mm,
        bias_field=bias_field,
        deformation_mm=deformation_mm,
    )
    root = Path(output_dir)
    _prepare_output(root, overwrite)
    _write_dataset_files(root, subjects, config)
    for i, label in enumerate(subjects):
        start = time.perf_counter()
        for ses in simulate_subject(i, config, sessions=sessions, with_t1w=label not in no_t1w):
            write_session(root, ses, config, sessions)
        logger.info("Wrote sub-%s in %.1f s", label, time.perf_counter() - start)
    logger.info("Wrote phantom dataset with %d subject(s) to %s", n_subjects, root)
    return root


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_shell(text: str) -> tuple[float, int]:
    try:
        b, n = text.split(":")
        return float(b), int(n)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected B:N (e.g. 1000:30), got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=GENERATOR_NAME,
        description="Write a BIDS dataset of digital brain phantoms (paired DWI and T1w).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("output_dir", type=Path, help="dataset root to create (absent or empty)")
    p.add_argument("--n-subjects", type=int, default=2, help="number of subjects")
    p.add_argument(
        "--voxel-size",
        type=float,
        default=2.0,
        metavar="MM",
        help="isotropic DWI voxel size in mm (4-6 for a tiny, fast dataset)",
    )
    p.add_argument(
        "--snr",
        type=float,
        default=30.0,
        help="mean b=0 brain signal / noise SD; 'inf' for noise-free",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--sessions",
        type=int,
        default=0,
        metavar="K",
        help="0: no session level; K>0: sessions ses-1..ses-K",
    )
    p.add_argument(
        "--without-t1w",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="subjects (e.g. 01 or sub-01) without a T1w",
    )
    p.add_argument(
        "--dwi-orientation",
        default="LAS",
        help="voxel axis codes of the stored DWI (e.g. LAS, RAS, LPS, PLS)",
    )
    p.add_argument("--n-b0", type=int, default=DEFAULT_N_B0, help="number of b=0 volumes")
    p.add_argument(
        "--shells",
        nargs="+",
        type=_parse_shell,
        metavar="B:N",
        default=list(DEFAULT_SHELLS),
        help="diffusion shells as b-value:directions",
    )
    p.add_argument("--no-bias-field", action="store_true", help="no intensity bias field")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT_DIR if it holds a phantom made by this tool",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        make_phantom_dataset(
            args.output_dir,
            n_subjects=args.n_subjects,
            voxel_size_mm=args.voxel_size,
            snr=args.snr,
            seed=args.seed,
            sessions=args.sessions,
            without_t1w=args.without_t1w,
            bvals=default_bvals(args.n_b0, args.shells),
            dwi_orientation=args.dwi_orientation,
            bias_field=not args.no_bias_field,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as exc:
        logger.error("%s", exc)
        return UsageError.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
