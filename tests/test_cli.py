"""The participant level through the real command line, PyBIDS and Nipype (SPEC §2, §8, §12)."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_deepanat import dmri
from bids_deepanat.bids import run_validator
from bids_deepanat.cli.run import main

pytestmark = pytest.mark.integration


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def participant_run(tiny_phantom, tmp_path_factory):
    """One full participant-level run over the tiny phantom; many tests read its outputs."""
    before = tree_digest(tiny_phantom)
    out = tmp_path_factory.mktemp("participant") / "out"
    code = main([str(tiny_phantom), str(out), "participant", "--save-maps", "--nprocs", "2"])
    return dict(code=code, out=out, bids=tiny_phantom, before=before)


def test_exit_zero_and_outputs_named_as_spec(participant_run):
    out = participant_run["out"]
    assert participant_run["code"] == 0
    for sub in ("01", "02"):
        folder = out / f"sub-{sub}" / "dwi"
        assert (folder / f"sub-{sub}_space-dwi_desc-brain_mask.nii.gz").is_file()
        assert (folder / f"sub-{sub}_space-dwi_desc-brain_mask.json").is_file()
        for channel in dmri.CHANNELS:
            assert (folder / f"sub-{sub}_space-dwi_desc-{channel}_dwimap.nii.gz").is_file()
            assert (folder / f"sub-{sub}_space-dwi_desc-{channel}_dwimap.json").is_file()
    assert list((out / "logs").glob("config-participant-*.yaml"))
    assert "DeepAnat" in (out / "logs" / "CITATION.md").read_text()


def test_input_dataset_is_untouched(participant_run):
    assert tree_digest(participant_run["bids"]) == participant_run["before"]


def test_outputs_on_the_dwi_grid_without_nan(participant_run):
    out, bids = participant_run["out"], participant_run["bids"]
    dwi = nib.load(bids / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    mask = nib.load(out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-brain_mask.nii.gz")
    assert mask.shape == dwi.shape[:3]
    np.testing.assert_allclose(mask.affine, dwi.affine)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(dwi.affine) != ("R", "A", "S")
    mask_data = np.asarray(mask.dataobj) > 0
    assert 0.05 < mask_data.mean() < 0.8
    for channel in dmri.CHANNELS:
        img = nib.load(out / "sub-01" / "dwi" / f"sub-01_space-dwi_desc-{channel}_dwimap.nii.gz")
        data = np.asarray(img.dataobj)
        assert img.shape == dwi.shape[:3] and np.isfinite(data).all()
        np.testing.assert_allclose(img.affine, dwi.affine)
        if channel not in ("meanb0", "meandwi"):
            assert not data[~mask_data].any()


def test_maps_equal_the_library_function(participant_run):
    """What the workflow writes is exactly what dmri.compute_maps gives for the same files."""
    out, bids = participant_run["out"], participant_run["bids"]
    dwi = bids / "sub-02" / "dwi" / "sub-02_dwi.nii.gz"
    img = nib.load(dwi)
    bvals, bvecs = dmri.read_gradients(dwi.with_name("sub-02_dwi.bval").read_text(),
                                       dwi.with_name("sub-02_dwi.bvec").read_text())
    maps = dmri.compute_maps(np.asarray(img.dataobj), img.affine, bvals, bvecs)
    l1 = nib.load(out / "sub-02" / "dwi" / "sub-02_space-dwi_desc-L1_dwimap.nii.gz").get_fdata()
    np.testing.assert_allclose(l1, maps.channel("L1"), rtol=1e-6)


def test_sidecars_and_dataset_description(participant_run):
    out = participant_run["out"]
    mask_meta = json.loads(
        (out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-brain_mask.json").read_text())
    assert mask_meta["Type"] == "Brain"
    assert mask_meta["Sources"][0] == "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"
    assert mask_meta["SpatialReference"] == "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"
    l1_meta = json.loads(
        (out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-L1_dwimap.json").read_text())
    assert l1_meta["Units"] == "um^2/ms" and l1_meta["SkullStripped"] is True
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids-deepanat"
    assert "raw" in description["DatasetLinks"]


def test_output_passes_the_bids_validator(participant_run):
    assert run_validator(participant_run["out"]) == []


def test_rerun_reuses_the_cache(participant_run):
    out, bids = participant_run["out"], participant_run["bids"]
    mask = out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-brain_mask.nii.gz"
    stamp = mask.stat().st_mtime_ns
    assert main([str(bids), str(out), "participant", "--save-maps", "--nprocs", "1",
                 "--skip-bids-validation"]) == 0
    assert mask.stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------- bad input


def run_cli(*args) -> int:
    return main([str(a) for a in args] + ["--nprocs", "1"])


def gradients_of(bids: Path, sub: str = "01"):
    stem = bids / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi"
    bval, bvec = Path(f"{stem}.bval"), Path(f"{stem}.bvec")
    return bval, bvec, *dmri.read_gradients(bval.read_text(), bvec.read_text())


def write_gradients(bval: Path, bvec: Path, bvals, bvecs) -> None:
    bval.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    bvec.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.asarray(bvecs).T)
                    + "\n")


def only_b0(bvals, bvecs):
    return bvals * 0, bvecs


def no_b0(bvals, bvecs):
    return np.where(bvals < 50, 1000.0, bvals), np.where(bvals[:, None] < 50, 1 / np.sqrt(3),
                                                         bvecs)


def five_directions(bvals, bvecs):
    axes = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.7071, 0.7071, 0], [0.7071, -0.7071, 0]])
    keep = bvals < 50
    return bvals, np.where(keep[:, None], 0.0, axes[np.arange(len(bvals)) % 5])


def nan_vector(bvals, bvecs):
    bvecs = bvecs.copy()
    bvecs[np.flatnonzero(bvals > 50)[0]] = np.nan
    return bvals, bvecs


def zero_vector(bvals, bvecs):
    bvecs = bvecs.copy()
    bvecs[np.flatnonzero(bvals > 50)[1]] = 0.0
    return bvals, bvecs


def fewer_bvals(bvals, bvecs):
    return bvals[:-1], bvecs[:-1]


@pytest.mark.parametrize(
    ("edit", "code", "message"),
    [
        (only_b0, 65, "only b=0 volumes"),
        (no_b0, 65, "no b=0 volume"),
        (five_directions, 65, "fewer than 6 non-collinear"),
        (nan_vector, 65, "are zero or not finite"),
        (zero_vector, 65, "are zero or not finite"),
        (fewer_bvals, 65, "but the image has"),
    ],
)
def test_bad_gradient_tables(phantom_copy, tmp_path, caplog, edit, code, message):
    bval, bvec, bvals, bvecs = gradients_of(phantom_copy)
    write_gradients(bval, bvec, *edit(bvals, bvecs))
    result = run_cli(phantom_copy, tmp_path / "out", "participant", "--skip-bids-validation",
                     "--participant-label", "01")
    assert result == code
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("sub-01_dwi.nii.gz" in e and message in e for e in errors), errors


def test_missing_bvec(phantom_copy, tmp_path, caplog):
    (phantom_copy / "sub-01" / "dwi" / "sub-01_dwi.bvec").unlink()
    assert run_cli(phantom_copy, tmp_path / "out", "participant", "--skip-bids-validation",
                   "--participant-label", "01") == 66
    assert any("sub-01_dwi.nii.gz: no .bvec file" in r.getMessage() for r in caplog.records)


def test_3d_image_where_4d_is_expected(phantom_copy, tmp_path, caplog):
    dwi = phantom_copy / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    img = nib.load(dwi)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), dwi)
    assert run_cli(phantom_copy, tmp_path / "out", "participant", "--skip-bids-validation",
                   "--participant-label", "01") == 65
    assert any("expected a 4D image" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["truncated", "not-nifti"])
def test_corrupt_image_fails_alone(phantom_copy, tmp_path, caplog, damage):
    """One subject's image is broken: exit 65 naming it, the other subject still gets outputs."""
    dwi = phantom_copy / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    if damage == "truncated":
        dwi.write_bytes(dwi.read_bytes()[: dwi.stat().st_size // 2])
    else:
        dwi.write_bytes(gzip.compress(b"this is not a NIfTI file" * 100))
    out = tmp_path / "out"
    assert run_cli(phantom_copy, out, "participant", "--skip-bids-validation") == 65
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "sub-01_dwi.nii.gz" in errors and "1 of 2 run(s) failed" in errors
    assert (out / "sub-02" / "dwi" / "sub-02_space-dwi_desc-brain_mask.nii.gz").is_file()
    assert not (out / "sub-01").exists()


def test_nan_voxels_are_zeroed_with_a_warning(phantom_copy, tmp_path):
    dwi = phantom_copy / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    img = nib.load(dwi)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[data.shape[0] // 2, data.shape[1] // 2, data.shape[2] // 2, :3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), dwi)
    out = tmp_path / "out"
    assert run_cli(phantom_copy, out, "participant", "--skip-bids-validation", "--save-maps",
                   "--participant-label", "01") == 0
    meta = json.loads((out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-brain_mask.json")
                      .read_text())
    assert any("NaN/Inf" in w for w in meta["Warnings"])
    l1 = nib.load(out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-L1_dwimap.nii.gz").get_fdata()
    assert np.isfinite(l1).all()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["participant", "--participant-label", "sub-09"], 18, "sub-01, sub-02"),
        (["participant", "--session-label", "3"], 18, "no DWI run matches"),
        (["training"], 17, "unknown analysis level"),
        (["participant", "--nprocs", "0"], 64, None),
        (["participant", "--no-such-option"], 64, None),
        (["participant", "--ignore", "slicetiming"], 64, None),
    ],
)
def test_selection_and_usage_errors(tiny_phantom, tmp_path, caplog, args, code, message):
    assert main([str(tiny_phantom), str(tmp_path / "out"), *args,
                 "--skip-bids-validation"]) == code
    if message:
        assert any(message in r.getMessage() for r in caplog.records)


def test_not_a_bids_dataset(tmp_path):
    (tmp_path / "in").mkdir()
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "participant"]) == 16


def test_validator_errors_stop_the_run(phantom_copy, tmp_path, caplog):
    (phantom_copy / "sub-01" / "dwi" / "sub-01_bogus.txt").write_text("x")
    assert main([str(phantom_copy), str(tmp_path / "out"), "participant"]) == 16
    assert any("--skip-bids-validation" in r.getMessage() for r in caplog.records)


def test_output_inside_the_input_is_refused(phantom_copy, caplog):
    before = tree_digest(phantom_copy)
    assert main([str(phantom_copy), str(phantom_copy / "derivatives" / "deepanat"),
                 "participant"]) == 64
    assert any("inside the input dataset" in r.getMessage() for r in caplog.records)
    assert tree_digest(phantom_copy) == before


def test_unwritable_output(tiny_phantom, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert main([str(tiny_phantom), str(blocker / "out"), "participant",
                 "--skip-bids-validation"]) == 73


def test_config_file_and_command_line(tiny_phantom, tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("participant-label: ['02']\nb0_threshold: 60\nsave_maps: false\n")
    out = tmp_path / "out"
    assert main([str(tiny_phantom), str(out), "participant", "--config", str(config),
                 "--skip-bids-validation", "--nprocs", "1", "--b0-threshold", "40"]) == 0
    assert not (out / "sub-01").exists() and (out / "sub-02").is_dir()
    import yaml

    written = yaml.safe_load(next((out / "logs").glob("config-*.yaml")).read_text())
    assert written["participant_label"] == ["02"] and written["b0_threshold"] == 40
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_setting: 1\n")
    assert main([str(tiny_phantom), str(out), "participant", "--config", str(bad)]) == 64


def test_console_script_version():
    exe = Path(sys.executable).with_name("bids-deepanat")
    if not exe.exists():
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("bids-deepanat ")


def test_help_shows_defaults(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--participant-label" in text and "--save-maps" in text and "default" in text


def test_user_mask(participant_run, tmp_path, caplog):
    """--mask PATH replaces the automatic mask; a mask on another grid is refused (exit 65)."""
    out, bids = participant_run["out"], participant_run["bids"]
    auto = out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-brain_mask.nii.gz"
    img = nib.load(auto)
    eroded = np.zeros(img.shape, np.uint8)
    eroded[1:-1, 1:-1, 1:-1] = np.asarray(img.dataobj)[1:-1, 1:-1, 1:-1]
    user_mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(eroded, img.affine), user_mask)
    new_out = tmp_path / "out"
    args = [str(bids), str(new_out), "participant", "--participant-label", "01",
            "--skip-bids-validation", "--nprocs", "1", "--mask", str(user_mask)]
    assert main(args) == 0
    written = new_out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-brain_mask.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(written).dataobj) > 0, eroded > 0)
    meta = json.loads(written.with_name("sub-01_space-dwi_desc-brain_mask.json").read_text())
    assert "given by the user" in meta["Description"]
    nib.save(nib.Nifti1Image(eroded[:-1], img.affine), user_mask)
    assert main(args[:1] + [str(tmp_path / "out2")] + args[2:]) == 65
    assert any("not on the grid" in r.getMessage() for r in caplog.records)
