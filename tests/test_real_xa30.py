"""The maps on real scanner data: the xa30 volunteer (Siemens XA30, b=2500 single shell)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import store_as

from bids_deepanat import dmri
from bids_deepanat.io import load_gradients, load_nifti

XA30 = Path(__file__).resolve().parents[1] / "data" / "xa30"
RUNS = ("dir-AP", "dir-PA")


def load_run(run: str):
    dwi = XA30 / "sub-01" / "dwi" / f"sub-01_{run}_dwi.nii.gz"
    img = load_nifti(dwi, ndim=4)
    bvals, bvecs = load_gradients(dwi, dwi.with_name(dwi.name.replace(".nii.gz", ".bval")),
                                  dwi.with_name(dwi.name.replace(".nii.gz", ".bvec")),
                                  img.shape[3], b0_threshold=50)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine, bvals, bvecs


@pytest.fixture(scope="module", params=RUNS)
def xa30_maps(request):
    data, affine, bvals, bvecs = load_run(request.param)
    return data, affine, bvals, bvecs, dmri.compute_maps(data, affine, bvals, bvecs)


def least_squares_fa(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray):
    """Independent log-linear least-squares tensor fit; FA does not depend on the frame."""
    unit = bvecs / np.maximum(np.linalg.norm(bvecs, axis=1, keepdims=True), 1e-12)
    x, y, z = unit.T
    b = bvals * 1e-3
    design = np.stack([np.ones_like(b), -b * x * x, -b * y * y, -b * z * z, -2 * b * x * y,
                       -2 * b * x * z, -2 * b * y * z], axis=1)
    signal = np.log(np.maximum(data[mask], 1.0))
    coef, *_ = np.linalg.lstsq(design, signal.T, rcond=None)
    dxx, dyy, dzz, dxy, dxz, dyz = coef[1:]
    tensors = np.stack([np.stack([dxx, dxy, dxz], -1), np.stack([dxy, dyy, dyz], -1),
                        np.stack([dxz, dyz, dzz], -1)], -2)
    evals = np.clip(np.linalg.eigvalsh(tensors), 0, None)
    md = evals.mean(-1, keepdims=True)
    return np.sqrt(1.5 * ((evals - md) ** 2).sum(-1) / np.maximum((evals**2).sum(-1), 1e-12))


def test_fallback_to_the_b2500_shell_is_reported(xa30_maps):
    *_, maps = xa30_maps
    assert any("lowest shell (b = 2500" in w for w in maps.warnings)


def test_mask_and_ranges_are_plausible(xa30_maps):
    data, affine, *_ , maps = xa30_maps
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    volume_ml = maps.mask.sum() * voxel_ml
    # a ~117 mm slab of an adult brain: several hundred millilitres, not the whole field of view
    assert 400 < volume_ml < 1500, volume_ml
    assert maps.mask.mean() < 0.6
    assert np.isfinite(maps.maps).all()
    md = maps.maps[maps.mask][:, 2:5].mean(-1)
    assert 0.5 < np.median(md) < 1.2  # brain tissue MD in µm²/ms


def test_fa_agrees_with_an_independent_least_squares_fit(xa30_maps):
    data, _, bvals, bvecs, maps = xa30_maps
    evals = maps.maps[maps.mask][:, 2:5]
    md = evals.mean(-1, keepdims=True)
    fa = np.sqrt(1.5 * ((evals - md) ** 2).sum(-1) / np.maximum((evals**2).sum(-1), 1e-12))
    reference = least_squares_fa(data, bvals, bvecs, maps.mask)
    r = np.corrcoef(fa, reference)[0, 1]
    assert r > 0.95, r


@pytest.mark.parametrize("axcodes", ["LAS", "PIL"])
def test_xa30_maps_do_not_depend_on_storage_order(xa30_maps, axcodes):
    data, affine, bvals, bvecs, maps = xa30_maps
    data2, affine2, bvecs2, back = store_as(data, affine, bvecs, axcodes)
    other = dmri.compute_maps(data2, affine2, bvals, bvecs2)
    np.testing.assert_array_equal(back(other.mask), maps.mask)
    scale = np.abs(maps.maps).max(axis=(0, 1, 2))
    np.testing.assert_allclose(back(other.maps) / scale, maps.maps / scale, rtol=0, atol=1e-5)


def test_header_is_as_documented():
    img = nib.load(XA30 / "sub-01" / "dwi" / "sub-01_dir-PA_dwi.nii.gz")
    assert img.shape == (72, 72, 39, 21)
