"""The participant level on real scanner data with a reversed phase-encoding pair (SPEC §5):
xa30's AP and PA runs, its whole-head T1w, real PyBIDS, Nipype and DIPY."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_deepanat.bids import run_validator
from bids_deepanat.cli.run import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

XA30 = Path(__file__).resolve().parents[1] / "data" / "xa30"
STEM = "sub-01/anat/sub-01_acq-dir{run}_space-dwi_desc-target_T1w"
FIELD = "sub-01/fmap/sub-01_acq-dir{run}_space-dwi_desc-sdc_{suffix}.nii.gz"


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("xa30")
    corrected, plain = root / "sdc", root / "plain"
    assert main([str(XA30), str(corrected), "participant", "--nprocs", "2"]) == 0
    assert main([str(XA30), str(plain), "participant", "--nprocs", "2", "--ignore",
                 "fieldmaps", "--skip-bids-validation"]) == 0
    return corrected, plain


@pytest.mark.parametrize("run", ["AP", "PA"])
def test_target_registered_through_the_undistorted_b0(outputs, run):
    corrected, plain = outputs
    meta = json.loads((corrected / f"{STEM.format(run=run)}.json").read_text())
    assert meta["Registration"]["CorrectionFromHeaderMaxMM"] < 2.0  # measured 1.3
    sdc = meta["DistortionCorrection"]
    assert sdc["B0PairCorrelationAfter"] > 0.97 > 0.6 > sdc["B0PairCorrelationBefore"]
    assert "bids:raw:sub-01/dwi/sub-01_dir-{}_dwi.nii.gz".format(
        "PA" if run == "AP" else "AP") in meta["Sources"]
    # Without the pair the rigid fit absorbs part of the distortion (measured 4.1 / 2.2 mm).
    plain_meta = json.loads((plain / f"{STEM.format(run=run)}.json").read_text())
    assert "DistortionCorrection" not in plain_meta
    assert not (plain / "sub-01" / "fmap").exists()
    assert plain_meta["Registration"]["CorrectionFromHeaderMaxMM"] > \
        meta["Registration"]["CorrectionFromHeaderMaxMM"]


def test_both_runs_find_one_field(outputs):
    """The AP and PA fits are separate estimates of one off-resonance field, in Hz."""
    corrected, _ = outputs
    ap, pa = (load(corrected / FIELD.format(run=r, suffix="fieldmap")) for r in ("AP", "PA"))
    brain = load(corrected / "sub-01/dwi/sub-01_dir-AP_space-dwi_desc-brain_mask.nii.gz") > 0
    assert np.abs(ap - pa)[brain].max() < 5.0  # Hz; measured 0.7
    assert 5.0 < np.median(np.abs(ap[brain])) < 60.0  # 3T brain: measured 14 Hz
    meta = json.loads((corrected / FIELD.format(run="AP", suffix="fieldmap")
                       ).with_suffix("").with_suffix(".json").read_text())
    assert meta["Units"] == "Hz" and meta["PhaseEncodingDirection"] == "j-"
    magnitude = load(corrected / FIELD.format(run="AP", suffix="magnitude"))
    assert magnitude.shape == ap.shape and magnitude[brain].min() >= 0


def test_targets_follow_the_distortion_of_their_run(outputs):
    """Each target sits in its own run's distorted grid: unwarping the AP target with the AP
    field and the PA target with the PA field gives one image (the T1w in true space)."""
    from bids_deepanat.sdc import unwarp

    corrected, _ = outputs
    readout = 0.0475693  # TotalReadoutTime of both runs (s)
    brain = load(corrected / "sub-01/dwi/sub-01_dir-AP_space-dwi_desc-brain_mask.nii.gz") > 0
    targets, undone = {}, {}
    for run, sign in (("AP", -1), ("PA", 1)):
        targets[run] = load(corrected / f"{STEM.format(run=run)}.nii.gz")
        field = load(corrected / FIELD.format(run=run, suffix="fieldmap"))
        undone[run] = unwarp(targets[run], sign * field * readout, 1, modulate=False)
    before = np.corrcoef(targets["AP"][brain], targets["PA"][brain])[0, 1]
    after = np.corrcoef(undone["AP"][brain], undone["PA"][brain])[0, 1]
    assert after > 0.97 and after > before + 0.1, (before, after)  # measured 0.75 -> 0.98


def test_rerun_notices_a_change_of_distortion_correction(outputs):
    """Outputs made without the pair are stale once the pair is used, and vice versa."""
    from bids_deepanat.bids import collect_runs, load_layout
    from bids_deepanat.workflows.outputs import is_complete

    corrected, plain = outputs
    layout = load_layout(XA30)
    for ignore, complete_in, stale_in in ((False, corrected, plain), (True, plain, corrected)):
        for run in collect_runs(layout, ignore_fieldmaps=ignore):
            kwargs = dict(save_maps=False, synthesize=False, model_sha256=None, processing={})
            assert is_complete(run, complete_in, **kwargs)
            assert not is_complete(run, stale_in, **kwargs)


def test_output_passes_the_bids_validator(outputs):
    assert run_validator(outputs[0]) == []


def test_without_readout_time_the_correction_still_runs(tmp_path):
    """No TotalReadoutTime/EffectiveEchoSpacing: the pair is assumed to share one readout, the
    displacement is fitted as usual, and no field in Hz is claimed."""
    from nipype.interfaces.base import isdefined

    from bids_deepanat.interfaces.registration import EstimateDistortion
    from bids_deepanat.registration import mean_b0

    stem = str(XA30 / "sub-01" / "dwi" / "sub-01_dir-{}_dwi")
    b0 = mean_b0(nib.load(f"{stem.format('AP')}.nii.gz"),
                 np.loadtxt(f"{stem.format('AP')}.bval"))
    mask = nib.Nifti1Image(np.ones(b0.shape, np.uint8), b0.affine)
    nib.save(b0, tmp_path / "b0.nii.gz")
    nib.save(mask, tmp_path / "mask.nii.gz")
    node = EstimateDistortion(
        meanb0_file=str(tmp_path / "b0.nii.gz"), mask_file=str(tmp_path / "mask.nii.gz"),
        reverse_file=f"{stem.format('PA')}.nii.gz", reverse_bval_file=f"{stem.format('PA')}.bval",
        phase_encoding="j-", reverse_phase_encoding="j")
    result = node.run(cwd=str(tmp_path))
    assert not isdefined(result.outputs.fieldmap_file)
    shift = load(Path(result.outputs.displacement_file))
    assert shift.shape == b0.shape and np.abs(shift).max() > 1.0
    assert result.outputs.metadata["B0PairCorrelationAfter"] > 0.97


def test_a_partner_without_b0_is_a_clear_error(tmp_path, caplog):
    """Only the AP run is selected; its PA partner's b-values hold no b=0: exit 65 naming the
    partner and the way out."""
    import shutil

    bids = tmp_path / "bids"
    shutil.copytree(XA30, bids)
    bval = bids / "sub-01" / "dwi" / "sub-01_dir-PA_dwi.bval"
    assert bval.read_text().startswith("0 ")
    bval.write_text("2500" + bval.read_text()[1:])
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"dwi": {"direction": "AP"}}))
    code = main([str(bids), str(tmp_path / "out"), "participant", "--nprocs", "1",
                 "--skip-bids-validation", "--bids-filter-file", str(filters)])
    assert code == 65
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "sub-01_dir-PA_dwi.nii.gz" in errors and "--ignore fieldmaps" in errors
