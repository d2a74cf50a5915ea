"""The digital brain phantom: layout, determinism, diffusion physics and BIDS validity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_deepanat import phantom
from bids_deepanat.dmri import fsl_bvecs_to_voxel

TINY = 5.0  # mm: the fast mode


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return phantom.make_phantom_dataset(
        tmp_path_factory.mktemp("tiny") / "bids", n_subjects=2, voxel_size_mm=TINY, seed=1
    )


@pytest.fixture(scope="module")
def tiny_sessions(tmp_path_factory) -> Path:
    return phantom.make_phantom_dataset(
        tmp_path_factory.mktemp("sessions") / "bids",
        n_subjects=2,
        voxel_size_mm=TINY,
        sessions=2,
        without_t1w=["sub-02"],
    )


def _load_dwi(root: Path, stem: str, folder: str = ""):
    base = root / (folder or stem.split("_")[0]) / "dwi" / f"{stem}_dwi"
    img = nib.load(f"{base}.nii.gz")
    bvals = np.loadtxt(f"{base}.bval", ndmin=1)
    bvecs = np.loadtxt(f"{base}.bvec", ndmin=2)
    return img, bvals, bvecs


def test_tiny_layout(tiny: Path):
    for name in ("dataset_description.json", "participants.tsv", "participants.json", "README"):
        assert (tiny / name).is_file(), name
    assert "Permission to use" in (tiny / "LICENSE").read_text()
    desc = json.loads((tiny / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.9.0" and desc["DatasetType"] == "raw"
    assert desc["GeneratedBy"][0]["Name"] == "bids-deepanat-phantom"
    rows = (tiny / "participants.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["sub-01", "sub-02"]

    for sub in ("sub-01", "sub-02"):
        dwi, bvals, bvecs = _load_dwi(tiny, sub)
        t1w = nib.load(tiny / sub / "anat" / f"{sub}_T1w.nii.gz")
        assert (tiny / sub / "anat" / f"{sub}_T1w.json").is_file()
        sidecar = json.loads((tiny / sub / "dwi" / f"{sub}_dwi.json").read_text())
        assert {"RepetitionTime", "EchoTime", "PhaseEncodingDirection", "TotalReadoutTime"} <= set(
            sidecar
        )
        assert dwi.ndim == 4 and t1w.ndim == 3
        assert dwi.shape[3] == bvals.size == bvecs.shape[1] == 66
        assert bvecs.shape[0] == 3
        assert np.sum(bvals == 0) == 6 and bvals[0] == 0
        assert np.allclose(bvecs[:, bvals == 0], 0)
        assert np.allclose(np.linalg.norm(bvecs[:, bvals > 0], axis=0), 1, atol=1e-5)
        assert nib.aff2axcodes(dwi.affine) == ("L", "A", "S")
        assert np.linalg.det(dwi.affine[:3, :3]) < 0
        assert not np.allclose(dwi.affine, t1w.affine)
        assert np.allclose(dwi.header.get_zooms()[:3], TINY)
        for img in (dwi, t1w):
            data = img.get_fdata()
            assert np.isfinite(data).all() and data.max() > 0

        truth = json.loads((tiny / "sourcedata" / "phantom" / f"{sub}_truth.json").read_text())
        assert "Description" in truth
        m = np.asarray(truth["T1wToDwiWorld"])
        assert m.shape == (4, 4)
        # A small rigid motion: orthonormal rotation, not the identity.
        assert np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-9)
        assert np.allclose(m[3], [0, 0, 0, 1])
        assert not np.allclose(m, np.eye(4), atol=1e-3)


def test_brain_inside_field_of_view(tiny: Path):
    truth = phantom.ground_truth(tiny, "01").truth
    frac = truth.fractions.sum(axis=-1)
    for axis in range(3):
        edges = np.take(frac, [0, -1], axis=axis)
        assert edges.max() < 0.01


def test_ground_truth_reproduces_written_images(tiny: Path):
    ses = phantom.ground_truth(tiny, "sub-02", with_t1w=True)
    dwi, _, bvecs = _load_dwi(tiny, "sub-02")
    assert np.allclose(ses.dwi.affine, dwi.affine)
    assert np.allclose(ses.bvecs.T, bvecs, atol=1e-6)
    written = dwi.get_fdata(dtype=np.float32)
    # Equal up to the int16 quantisation of the stored image.
    assert np.abs(written - ses.dwi.get_fdata(dtype=np.float32)).max() < 1e-3 * written.max()


def test_deterministic(tmp_path: Path):
    def arrays(seed: int, name: str):
        root = phantom.make_phantom_dataset(
            tmp_path / name, n_subjects=1, voxel_size_mm=TINY, seed=seed
        )
        dwi, bvals, bvecs = _load_dwi(root, "sub-01")
        t1w = nib.load(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
        return dwi.get_fdata(), t1w.get_fdata(), bvecs

    a, b, c = arrays(7, "a"), arrays(7, "b"), arrays(8, "c")
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.allclose(a[0], c[0])
    assert not np.allclose(a[1], c[1])


def _tensor_fit(signal: np.ndarray, b0: np.ndarray, g_vox: np.ndarray, b: float):
    """Log-linear least-squares tensor (µm²/ms) for (N, V) signals on one shell."""
    g = g_vox
    design = -b * np.stack(
        [g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1],
         2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]],
        axis=1,
    )  # fmt: skip
    y = np.log(np.maximum(signal, 1e-6) / b0[:, None])
    coef = np.linalg.lstsq(design, y.T, rcond=None)[0].T * 1e3
    d = np.empty((coef.shape[0], 3, 3))
    d[:, 0, 0], d[:, 1, 1], d[:, 2, 2] = coef[:, 0], coef[:, 1], coef[:, 2]
    d[:, 0, 1] = d[:, 1, 0] = coef[:, 3]
    d[:, 0, 2] = d[:, 2, 0] = coef[:, 4]
    d[:, 1, 2] = d[:, 2, 1] = coef[:, 5]
    return np.linalg.eigh(d)


def _noise_free(tmp_path: Path, voxel_size_mm: float, orientation: str = "LAS"):
    root = phantom.make_phantom_dataset(
        tmp_path / "bids",
        n_subjects=1,
        voxel_size_mm=voxel_size_mm,
        snr=None,
        without_t1w=["01"],
        dwi_orientation=orientation,
    )
    dwi, bvals, bvecs = _load_dwi(root, "sub-01")
    data = dwi.get_fdata()
    shell = bvals == 1000
    b0 = data[..., bvals == 0].mean(axis=-1)
    # Gradients as a reader would get them: from the .bvec file of the stored image.
    g_vox = fsl_bvecs_to_voxel(bvecs.T, dwi.affine)[shell]
    return dwi, data[..., shell], b0, g_vox, phantom.ground_truth(root, "01").truth


# "ASR" stores the axes permuted (non-symmetric voxel-to-world rotation), which catches a
# transposed rotation in the b-vector conversion that LAS alone would not.
@pytest.mark.parametrize("orientation", ["LAS", "ASR"])
def test_tensor_fit_recovers_fibre_directions(tmp_path: Path, orientation: str):
    dwi, data, b0, g_vox, truth = _noise_free(tmp_path, TINY, orientation)
    assert nib.aff2axcodes(dwi.affine) == tuple(orientation)
    wm = truth.fractions[..., 2] > 0.8
    assert wm.sum() > 100
    evals, evecs = _tensor_fit(data[wm], b0[wm], g_vox, 1000.0)
    v_world = evecs[:, :, -1] @ phantom.rotation_part(dwi.affine).T
    cos = np.abs(np.sum(v_world * truth.fibre_world[wm], axis=-1))
    angle = np.degrees(np.arccos(np.clip(cos, 0, 1)))
    assert np.median(angle) < 1.0 and angle.max() < 5.0
    # Axial diffusivity of WM ≈ 1.7, radial 0.3-0.4 µm²/ms (diluted a little by GM/CSF).
    assert 1.3 < np.median(evals[:, 2]) < 1.9
    assert 0.25 < np.median(evals[:, 0]) < 0.6


def test_csf_mean_diffusivity_is_free_water(tmp_path: Path):
    # 3 mm voxels: at 5 mm hardly any voxel is pure CSF.
    _, data, b0, g_vox, truth = _noise_free(tmp_path, 3.0)
    csf = truth.fractions[..., 0] > 0.97
    assert csf.sum() > 3
    evals, _ = _tensor_fit(data[csf], b0[csf], g_vox, 1000.0)
    md = evals.mean(axis=1)
    assert np.all(np.abs(md - 3.0) < 0.2), md


def test_b0_contrast_is_t2_like(tmp_path: Path):
    ses = phantom.simulate_subject(
        0, phantom.PhantomConfig(voxel_size_mm=TINY, snr=None, bias_field=False), with_t1w=False
    )[0]
    b0 = ses.dwi.get_fdata()[..., 0]
    frac = ses.truth.fractions
    means = [b0[frac[..., t] > 0.7].mean() for t in range(3)]
    assert means[0] > means[1] > means[2]  # CSF > GM > WM


def test_fibre_directions_vary(tiny: Path):
    truth = phantom.ground_truth(tiny, "01").truth
    dirs = truth.fibre_world[truth.fractions[..., 2] > 0.5]
    assert len(dirs) > 200
    assert np.allclose(np.linalg.norm(dirs, axis=-1), 1, atol=1e-4)
    # Most common direction: the one with the most voxels within 20° (axial, sign-free).
    cone = np.abs(dirs @ dirs.T) > np.cos(np.radians(20))
    assert cone.mean(axis=1).max() < 0.8
    # Every major axis is the dominant one somewhere (LR corpus callosum, SI corticospinal).
    dominant = np.bincount(np.abs(dirs).argmax(axis=1), minlength=3) / len(dirs)
    assert dominant.min() > 0.03, dominant


def test_sessions_and_missing_t1w(tiny_sessions: Path):
    root = tiny_sessions
    for ses in ("1", "2"):
        assert (root / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_T1w.nii.gz").is_file()
        for sub in ("01", "02"):
            stem = f"sub-{sub}_ses-{ses}"
            assert (root / f"sub-{sub}" / f"ses-{ses}" / "dwi" / f"{stem}_dwi.nii.gz").is_file()
            assert (root / "sourcedata" / "phantom" / f"{stem}_truth.json").is_file()
    assert not (root / "sub-02" / "ses-1" / "anat").exists()
    assert not list((root / "sub-02").rglob("*T1w*"))
    # A new head pose per session.
    p1, p2 = (
        json.loads((root / "sourcedata" / "phantom" / f"sub-01_ses-{s}_truth.json").read_text())
        for s in ("1", "2")
    )
    assert not np.allclose(p1["DwiPose"], p2["DwiPose"])


def test_tiny_subject_is_fast():
    config = phantom.PhantomConfig(voxel_size_mm=TINY)
    phantom.simulate_subject(0, config)  # template caches
    start = time.perf_counter()
    phantom.simulate_subject(1, config)
    assert time.perf_counter() - start < 5.0


def test_cli_refuses_non_empty_dir(tmp_path: Path):
    out = tmp_path / "bids"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert phantom.main([str(out), "--voxel-size", "6", "--n-subjects", "1"]) != 0
    assert phantom.main([str(out), "--voxel-size", "6", "--n-subjects", "1", "--overwrite"]) != 0
    assert (out / "keep.txt").read_text() == "user data"


def test_cli_writes_and_overwrites(tmp_path: Path):
    out = tmp_path / "bids"
    args = [str(out), "--voxel-size", "6", "--n-subjects", "1", "--snr", "inf",
            "--dwi-orientation", "lps", "--shells", "1000:12", "--n-b0", "2"]  # fmt: skip
    assert phantom.main(args) == 0
    dwi, bvals, _ = _load_dwi(out, "sub-01")
    assert nib.aff2axcodes(dwi.affine) == ("L", "P", "S")
    assert dwi.shape[3] == bvals.size == 14
    assert phantom.main(args) != 0  # not empty now
    assert phantom.main([*args, "--overwrite", "--n-subjects", "2"]) == 0
    assert (out / "sub-02").is_dir()


def _validator() -> str | None:
    exe = Path(sys.executable).parent / "bids-validator-deno"
    return str(exe) if exe.exists() else shutil.which("bids-validator-deno")


@pytest.mark.integration
@pytest.mark.parametrize("dataset", ["tiny", "tiny_sessions"])
def test_bids_validator(request, dataset: str):
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    root = request.getfixturevalue(dataset)
    proc = subprocess.run(
        [exe, str(root), "--json"], capture_output=True, text=True, timeout=300, check=False
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"validator gave no JSON (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    issues = report["issues"]["issues"]
    errors = [i for i in issues if i.get("severity") == "error"]
    assert not errors, json.dumps(errors, indent=1)[:5000]
