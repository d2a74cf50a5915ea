"""The diffusion maps against analytic tensors and invariance to how a file stores its axes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import store_as
from nibabel import orientations

from bids_deepanat import dmri
from bids_deepanat.errors import InvalidInputError


def fibonacci_hemisphere(n: int, rotation: float = 0.0) -> np.ndarray:
    """``n`` well-spread unit vectors on the upper hemisphere."""
    k = np.arange(n) + 0.5
    z = 1.0 - k / n
    phi = k * np.pi * (3.0 - np.sqrt(5.0)) + rotation
    r = np.sqrt(1.0 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def scheme(n_b0: int = 4, shells: tuple[float, ...] = (1000.0, 2000.0), n_dirs: int = 30):
    bvals = [0.0] * n_b0
    bvecs = [np.zeros((n_b0, 3))]
    for i, b in enumerate(shells):
        bvals += [b] * n_dirs
        bvecs.append(fibonacci_hemisphere(n_dirs, rotation=0.7 * i))
    return np.array(bvals), np.concatenate(bvecs)


def axial_eigenvalues(md: float, fa: float) -> np.ndarray:
    """Eigenvalues (λ1 ≥ λ2 = λ3) with the given mean diffusivity and fractional anisotropy."""
    t = np.sqrt(3 * fa**2 / (9 - 6 * fa**2))
    return md * np.array([1 + 2 * t, 1 - t, 1 - t])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def fa_of(evals: np.ndarray) -> np.ndarray:
    md = evals.mean(-1, keepdims=True)
    return np.sqrt(1.5 * ((evals - md) ** 2).sum(-1) / (evals**2).sum(-1))


@pytest.fixture(scope="module")
def analytic_voxels():
    """A 1-D row of voxels with known tensors: FA 0–0.9, MD 0.3–3 µm²/ms, random orientations."""
    rng = np.random.default_rng(7)
    evals, rotations = [], []
    for md in (0.3, 0.8, 1.5, 3.0):
        for fa in (0.0, 0.2, 0.5, 0.7, 0.9):
            lam = axial_eigenvalues(md, fa)
            if lam[0] > dmri.MAX_EIGENVALUE_UM2_PER_MS:
                lam = lam * dmri.MAX_EIGENVALUE_UM2_PER_MS / lam[0] * 0.99
            for _ in range(3):
                evals.append(lam)
                rotations.append(random_rotation(rng))
    # a non-axially-symmetric (planar) tensor as well
    evals.append(np.array([1.9, 1.1, 0.4]))
    rotations.append(random_rotation(rng))
    evals, rotations = np.array(evals), np.array(rotations)
    tensors = np.einsum("nij,nj,nkj->nik", rotations, evals, rotations)  # µm²/ms
    bvals, bvecs = scheme()
    s0 = rng.uniform(500, 2000, size=len(evals))
    adc = np.einsum("gi,nij,gj->ng", bvecs, tensors, bvecs)
    signal = s0[:, None] * np.exp(-bvals[None, :] * 1e-3 * adc)
    data = signal[:, None, None, :]  # (N, 1, 1, G)
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    maps = dmri.compute_maps(
        data, las, bvals, dmri.voxel_to_fsl_bvecs(bvecs, las), mask=np.ones(data.shape[:3], bool)
    )
    return dict(evals=evals, tensors=tensors, s0=s0, maps=maps, bvals=bvals, bvecs=bvecs)


def test_analytic_set_covers_the_range(analytic_voxels):
    evals = analytic_voxels["evals"]
    assert fa_of(evals).min() < 1e-6 and fa_of(evals).max() > 0.85
    assert evals.mean(-1).min() <= 0.31 and evals.mean(-1).max() >= 2.9


def test_eigenvalues_match_known_tensors(analytic_voxels):
    maps = analytic_voxels["maps"]
    fitted = np.stack([maps.channel(c)[:, 0, 0] for c in ("L1", "L2", "L3")], axis=-1)
    np.testing.assert_allclose(fitted, analytic_voxels["evals"], rtol=1e-3, atol=1e-6)


def test_synthetic_dwis_match_analytic_values(analytic_voxels):
    """With an LAS affine the RAS frame flips x: the DSM6 directions live in the RAS+ frame."""
    maps = analytic_voxels["maps"]
    tensors = analytic_voxels["tensors"].copy()
    # the data above were simulated with gradients in the stored (LAS) voxel frame; in RAS+ the
    # first axis is reversed, so the tensor seen there has its x row and column negated.
    flip = np.diag([-1.0, 1.0, 1.0])
    tensors_ras = flip @ tensors @ flip
    meanb0 = maps.channel("meanb0")[:, 0, 0]
    np.testing.assert_allclose(meanb0, analytic_voxels["s0"], rtol=1e-5)
    adc = np.einsum("di,nij,dj->nd", dmri.DSM6_DIRECTIONS, tensors_ras, dmri.DSM6_DIRECTIONS)
    expected = analytic_voxels["s0"][:, None] * np.exp(-1.0 * adc)
    fitted = np.stack([maps.channel(f"dwi{k}")[:, 0, 0] for k in range(1, 7)], axis=-1)
    np.testing.assert_allclose(fitted, expected, rtol=1e-4)


def test_meandwi_uses_the_dti_shell_only(analytic_voxels):
    maps, bvals = analytic_voxels["maps"], analytic_voxels["bvals"]
    s0, tensors, bvecs = analytic_voxels["s0"], analytic_voxels["tensors"], analytic_voxels["bvecs"]
    shell = bvals == 1000
    adc = np.einsum("gi,nij,gj->ng", bvecs[shell], tensors, bvecs[shell])
    expected = (s0[:, None] * np.exp(-adc)).mean(axis=1)
    np.testing.assert_allclose(maps.channel("meandwi")[:, 0, 0], expected, rtol=1e-5)


def test_dsm6_directions_are_unit():
    np.testing.assert_allclose(np.linalg.norm(dmri.DSM6_DIRECTIONS, axis=1), 1.0)
    assert dmri.CHANNELS[:5] == ("meanb0", "meandwi", "L1", "L2", "L3")
    assert len(dmri.CHANNELS) == 11


def test_fsl_convention_roundtrip():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 3))
    for affine in (np.eye(4), np.diag([-1.0, 1, 1, 1])):
        back = dmri.fsl_bvecs_to_voxel(dmri.voxel_to_fsl_bvecs(g, affine), affine)
        np.testing.assert_array_equal(back, g)
    # RAS storage (det > 0): FSL negates x; LAS storage: unchanged
    np.testing.assert_array_equal(dmri.voxel_to_fsl_bvecs(g, np.eye(4))[:, 0], -g[:, 0])
    np.testing.assert_array_equal(dmri.voxel_to_fsl_bvecs(g, np.diag([-1.0, 1, 1, 1])), g)


# --------------------------------------------------------------------------- selection


def test_select_volumes_default_and_fallback():
    bvals = np.array([0, 5, 1000, 1000, 2000, 3000])
    sel = dmri.select_volumes(bvals)
    assert sel.b0.tolist() == [True, True, False, False, False, False]
    assert sel.dti.tolist() == [False, False, True, True, False, False]
    assert sel.fallback_shell is None
    sel = dmri.select_volumes(np.array([0, 2495, 2500, 2505, 5000]))
    assert sel.dti.tolist() == [False, True, True, True, False]
    assert sel.fallback_shell == 2500


# --------------------------------------------------------------------------- bad tables

GOOD_BVALS, GOOD_BVECS = scheme(n_b0=1, shells=(1000.0,), n_dirs=6)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b, v: (b[:-1], v[:-1]), "image has 7 volumes"),
        (lambda b, v: (b * 0 + 1000, v), "no b=0 volume"),
        (lambda b, v: (b * 0, v), "only b=0 volumes"),
        (lambda b, v: (b, np.where(np.arange(7)[:, None] == 3, np.nan, v)), "volumes [3]"),
        (lambda b, v: (b, np.where(np.arange(7)[:, None] == 2, 0.0, v)), "volumes [2]"),
        (lambda b, v: (np.r_[0, [1000] * 6], np.r_[[[0, 0, 0]], [[1, 0, 0]] * 3,
                                                    [[0, 1, 0]] * 3]), "fewer than 6"),
        (lambda b, v: (np.where(np.arange(7) == 1, np.nan, b), v), "NaN or Inf"),
        (lambda b, v: (np.where(np.arange(7) == 1, -5.0, b), v), "negative"),
    ],
    ids=["count", "no-b0", "only-b0", "nan-bvec", "zero-bvec", "five-directions", "nan-bval",
         "negative-bval"],
)
def test_bad_gradient_tables(edit, message):
    bvals, bvecs = edit(GOOD_BVALS.copy(), GOOD_BVECS.copy())
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dmri.validate_gradients(np.asarray(bvals, float), np.asarray(bvecs, float), 7)


def test_good_table_is_accepted_and_normalized():
    unit = dmri.validate_gradients(GOOD_BVALS, GOOD_BVECS * 2.0, 7)
    np.testing.assert_allclose(np.linalg.norm(unit[1:], axis=1), 1.0)


def test_read_gradients_accepts_both_layouts():
    bvals, bvecs = dmri.read_gradients("0 1000 1000 1000\n", "0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    assert bvecs.shape == (4, 3)
    np.testing.assert_array_equal(bvecs[1], [1, 0, 0])
    _, transposed = dmri.read_gradients("0 1000 1000 1000", "0 0 0\n1 0 0\n0 1 0\n0 0 1\n")
    np.testing.assert_array_equal(transposed, bvecs)
    with pytest.raises(InvalidInputError, match="not numbers"):
        dmri.read_gradients("0 a", "0 0\n0 0\n0 0")


def test_3d_and_all_zero_images_are_rejected():
    bvals, bvecs = GOOD_BVALS, GOOD_BVECS
    with pytest.raises(InvalidInputError, match="4D"):
        dmri.compute_maps(np.ones((4, 4, 4)), np.eye(4), bvals, bvecs)
    with pytest.raises(InvalidInputError, match="all zeros"):
        dmri.compute_maps(np.zeros((4, 4, 4, 7)), np.eye(4), bvals, bvecs)


def test_nan_voxels_are_zeroed_with_a_warning(analytic_voxels):
    bvals, bvecs = analytic_voxels["bvals"], analytic_voxels["bvecs"]
    rng = np.random.default_rng(3)
    data = rng.uniform(100, 200, size=(6, 6, 6, len(bvals))).astype(np.float32)
    data[2, 2, 2, 5] = np.nan
    data[1, 2, 3, 0] = np.inf
    maps = dmri.compute_maps(data, np.eye(4), bvals, bvecs, mask=np.ones((6, 6, 6), bool))
    assert np.isfinite(maps.maps).all()
    assert any("NaN/Inf" in w for w in maps.warnings)


# --------------------------------------------------------------------------- orientation


def smooth_tensor_volume(shape=(14, 12, 10), seed=11):
    """A blob-shaped 'brain' with smoothly varying anisotropic tensors, stored LAS."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    bvals, bvecs = scheme(n_b0=3, shells=(1000.0,), n_dirs=12)
    direction = ndimage.gaussian_filter(rng.normal(size=shape + (3,)), (2, 2, 2, 0))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    lam1, lam2 = 1.7, 0.4
    tensors = lam2 * np.eye(3) + (lam1 - lam2) * direction[..., :, None] * direction[..., None, :]
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    s0 = 1000.0 * (np.linalg.norm(grid / [0.8, 0.8, 0.8], axis=-1) < 1) + 20.0
    adc = np.einsum("gi,...ij,gj->...g", bvecs, tensors, bvecs)
    data = s0[..., None] * np.exp(-bvals * 1e-3 * adc) + rng.uniform(0, 5, shape + (len(bvals),))
    affine = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -20], [0, 0, 2.2, -10], [0, 0, 0, 1]])
    return data.astype(np.float32), affine, bvals, dmri.voxel_to_fsl_bvecs(bvecs, affine)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR", "SLA"])
def test_maps_do_not_depend_on_storage_order(axcodes):
    data, affine, bvals, bvecs = smooth_tensor_volume()
    reference = dmri.compute_maps(data, affine, bvals, bvecs)
    data2, affine2, bvecs2, back = store_as(data, affine, bvecs, axcodes)
    assert "".join(orientations.aff2axcodes(affine2)) == axcodes
    other = dmri.compute_maps(data2, affine2, bvals, bvecs2)
    np.testing.assert_array_equal(back(other.mask), reference.mask)
    scale = np.abs(reference.maps).max(axis=(0, 1, 2))
    np.testing.assert_allclose(back(other.maps) / scale, reference.maps / scale, rtol=0, atol=1e-5)
    assert reference.mask.sum() > 100


@pytest.mark.parametrize("axcodes", ["RAS", "LAS", "ASL", "IPR"])
def test_phantom_maps_do_not_depend_on_storage_order(tiny_phantom, axcodes):
    """One phantom DWI (stored LPS/LAS by the phantom) rewritten RAS, LAS and permuted."""
    import nibabel as nib

    from bids_deepanat.dmri import read_gradients

    dwi = tiny_phantom / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    img = nib.load(dwi)
    data, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine
    bvals, bvecs = read_gradients(dwi.with_suffix("").with_suffix(".bval").read_text(),
                                  dwi.with_suffix("").with_suffix(".bvec").read_text())
    reference = dmri.compute_maps(data, affine, bvals, bvecs)
    data2, affine2, bvecs2, back = store_as(data, affine, bvecs, axcodes)
    other = dmri.compute_maps(data2, affine2, bvals, bvecs2)
    np.testing.assert_array_equal(back(other.mask), reference.mask)
    scale = np.abs(reference.maps).max(axis=(0, 1, 2))
    np.testing.assert_allclose(back(other.maps) / scale, reference.maps / scale, rtol=0, atol=1e-5)
    assert reference.mask.sum() > 500
