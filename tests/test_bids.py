"""PyBIDS discovery on real trees and the one naming function for derivatives."""

from __future__ import annotations

from pathlib import Path

import pytest

from bids_deepanat import bids
from bids_deepanat.errors import InvalidDatasetError, NothingSelectedError


def run_with(**entities) -> bids.DwiRun:
    return bids.DwiRun(entities=entities, dwi=Path("x"), bval=None, bvec=None)


@pytest.mark.parametrize(
    ("entities", "datatype", "expected"),
    [
        ({"subject": "01"}, "anat", "sub-01/anat/sub-01_space-dwi_desc-synth_T1w.nii.gz"),
        ({"subject": "01", "direction": "AP"}, "anat",
         "sub-01/anat/sub-01_acq-dirAP_space-dwi_desc-synth_T1w.nii.gz"),
        ({"subject": "01", "session": "1", "acquisition": "hi", "direction": "PA", "run": "2"},
         "anat",
         "sub-01/ses-1/anat/sub-01_ses-1_acq-hidirPA_run-2_space-dwi_desc-synth_T1w.nii.gz"),
        ({"subject": "01", "session": "1", "acquisition": "hi", "direction": "PA", "run": "2"},
         "dwi",
         "sub-01/ses-1/dwi/sub-01_ses-1_acq-hi_dir-PA_run-2_space-dwi_desc-synth_T1w.nii.gz"),
    ],
)
def test_derivative_names_fold_dir_into_acq_for_anat(entities, datatype, expected):
    path = bids.derivative_path(run_with(**entities), datatype=datatype, desc="synth",
                                suffix="T1w")
    assert path.as_posix() == expected


def test_labels_cannot_escape_the_output_folder():
    with pytest.raises(ValueError, match="not a BIDS label"):
        bids.derivative_path(run_with(subject="../../etc"), datatype="dwi", suffix="mask")


@pytest.fixture
def dataset(tree):
    dwi = {f"{stem}_dwi.{ext}": None for stem in (
        "sub-01/dwi/sub-01_dir-AP", "sub-01/dwi/sub-01_dir-PA",
        "sub-02/ses-1/dwi/sub-02_ses-1", "sub-02/ses-2/dwi/sub-02_ses-2_acq-hi_run-1",
        "sub-03/dwi/sub-03") for ext in ("nii.gz", "bval", "bvec")}
    del dwi["sub-03/dwi/sub-03_dwi.bvec"]
    return tree({
        **dwi,
        "sub-01/anat/sub-01_T1w.nii.gz": None,
        "sub-02/anat/sub-02_T1w.nii.gz": None,  # session-less T1w
        "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz": None,  # preferred for ses-2
    })


def test_collect_runs_keeps_entities_apart(dataset):
    runs = bids.collect_runs(bids.load_layout(dataset))
    assert [r.name for r in runs] == [
        "sub-01_dir-AP", "sub-01_dir-PA", "sub-02_ses-1", "sub-02_ses-2_acq-hi_run-1", "sub-03"]
    by_name = {r.name: r for r in runs}
    assert by_name["sub-01_dir-AP"].t1w.name == "sub-01_T1w.nii.gz"
    assert by_name["sub-02_ses-1"].t1w.name == "sub-02_T1w.nii.gz"
    assert by_name["sub-02_ses-2_acq-hi_run-1"].t1w.name == "sub-02_ses-2_T1w.nii.gz"
    assert by_name["sub-03"].t1w is None
    assert by_name["sub-03"].bvec is None and by_name["sub-03"].bval is not None
    assert by_name["sub-01_dir-PA"].bval.name == "sub-01_dir-PA_dwi.bval"


def test_labels_with_and_without_prefix(dataset):
    layout = bids.load_layout(dataset)
    plain = bids.collect_runs(layout, participant_labels=["02"], session_labels=["2"])
    prefixed = bids.collect_runs(layout, participant_labels=["sub-02"], session_labels=["ses-2"])
    assert [r.name for r in plain] == [r.name for r in prefixed] == ["sub-02_ses-2_acq-hi_run-1"]


def test_filters(dataset):
    runs = bids.collect_runs(bids.load_layout(dataset), filters={"dwi": {"direction": "PA"}})
    assert [r.name for r in runs] == ["sub-01_dir-PA"]


def test_unknown_participant_lists_what_exists(dataset):
    with pytest.raises(NothingSelectedError, match="sub-01, sub-02, sub-03"):
        bids.collect_runs(bids.load_layout(dataset), participant_labels=["sub-09"])
    with pytest.raises(NothingSelectedError, match="ses-1, ses-2"):
        bids.collect_runs(bids.load_layout(dataset), session_labels=["7"])


def test_not_a_bids_dataset(tmp_path):
    with pytest.raises(InvalidDatasetError, match="no dataset_description.json"):
        bids.validate_dataset(tmp_path, skip_validator=True)
    with pytest.raises(InvalidDatasetError, match="not a directory"):
        bids.validate_dataset(tmp_path / "nothing", skip_validator=True)


# --------------------------------------------------------------------------- reversed-PE pairs


@pytest.fixture
def pepolar(tree, tmp_path):
    """Real NIfTI headers: sub-01 AP/PA DWI pair; sub-02 an AP run with an fmap EPI meant for it
    and a second AP run; sub-03 a pair on different grids; sub-04 a pair but no T1w."""
    import numpy as np
    from conftest import make_nifti

    grid, other = np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([2.5, 2.5, 2.5, 1.0])
    files: dict = {}
    images: list[tuple[str, np.ndarray, tuple]] = []

    def dwi(stem, pe, affine=grid):
        files[f"{stem}_dwi.json"] = {"PhaseEncodingDirection": pe, "TotalReadoutTime": 0.05}
        files[f"{stem}_dwi.bval"] = "0 1000"
        files[f"{stem}_dwi.bvec"] = "1 0\n0 1\n0 0"
        images.append((f"{stem}_dwi.nii.gz", affine, (6, 7, 5, 2)))

    dwi("sub-01/dwi/sub-01_dir-AP", "j-")
    dwi("sub-01/dwi/sub-01_dir-PA", "j")
    dwi("sub-02/dwi/sub-02_dir-AP_run-1", "j-")
    dwi("sub-02/dwi/sub-02_dir-AP_run-2", "j-")
    dwi("sub-02/dwi/sub-02_dir-PA", "j")  # the run-1 EPI is preferred over it
    files["sub-02/fmap/sub-02_dir-PA_epi.json"] = {
        "PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05,
        "IntendedFor": ["bids::sub-02/dwi/sub-02_dir-AP_run-1_dwi.nii.gz"]}
    images.append(("sub-02/fmap/sub-02_dir-PA_epi.nii.gz", grid, (6, 7, 5, 3)))
    dwi("sub-03/dwi/sub-03_dir-AP", "j-")
    dwi("sub-03/dwi/sub-03_dir-PA", "j", other)
    dwi("sub-04/dwi/sub-04_dir-AP", "j-")
    dwi("sub-04/dwi/sub-04_dir-PA", "j")
    # The older IntendedFor (relative to the subject folder), and B0FieldIdentifier/Source.
    dwi("sub-05/dwi/sub-05_dir-AP", "j-")
    files["sub-05/fmap/sub-05_dir-PA_epi.json"] = {
        "PhaseEncodingDirection": "j", "IntendedFor": "dwi/sub-05_dir-AP_dwi.nii.gz"}
    dwi("sub-06/dwi/sub-06_dir-LR", "i-")
    files["sub-06/dwi/sub-06_dir-LR_dwi.json"]["B0FieldSource"] = "pepolar1"
    files["sub-06/fmap/sub-06_dir-RL_epi.json"] = {
        "PhaseEncodingDirection": "i", "B0FieldIdentifier": "pepolar1"}
    for sub in ("05", "06"):
        rl = "RL" if sub == "06" else "PA"
        images.append((f"sub-{sub}/fmap/sub-{sub}_dir-{rl}_epi.nii.gz", grid, (6, 7, 5)))
    # Partners never cross sessions; a DWI partner needs its b-values.
    dwi("sub-07/ses-1/dwi/sub-07_ses-1_dir-AP", "j-")
    dwi("sub-07/ses-2/dwi/sub-07_ses-2_dir-PA", "j")
    dwi("sub-08/dwi/sub-08_dir-AP", "j-")
    dwi("sub-08/dwi/sub-08_dir-PA", "j")
    del files["sub-08/dwi/sub-08_dir-PA_dwi.bval"]
    for sub in ("01", "02", "03", "05", "06", "07", "08"):
        images.append((f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz", grid, (6, 7, 5)))
    root = tree(files)
    for rel, affine, shape in images:
        make_nifti(root / rel, np.ones(shape), affine)
    return root


def test_reversed_phase_encoding_partners(pepolar, caplog):
    runs = {r.name: r for r in bids.collect_runs(bids.load_layout(pepolar))}
    ap, pa = runs["sub-01_dir-AP"], runs["sub-01_dir-PA"]
    assert (ap.phase_encoding, ap.readout_time) == ("j-", 0.05)
    assert ap.reverse_pe.image == pa.dwi and ap.reverse_pe.bval == pa.bval
    assert ap.reverse_pe.phase_encoding == "j" and pa.reverse_pe.image == ap.dwi
    # An fmap EPI meant for the run comes first; a run with the same direction is no partner.
    epi = runs["sub-02_dir-AP_run-1"].reverse_pe
    assert epi.image.name == "sub-02_dir-PA_epi.nii.gz" and epi.bval is None
    assert runs["sub-02_dir-AP_run-2"].reverse_pe.image == runs["sub-02_dir-PA"].dwi
    assert runs["sub-05_dir-AP"].reverse_pe.image.name == "sub-05_dir-PA_epi.nii.gz"
    sub06 = runs["sub-06_dir-LR"].reverse_pe
    assert sub06.image.name == "sub-06_dir-RL_epi.nii.gz" and sub06.readout_time is None
    # Another grid: not used, and said so; no T1w: not needed.
    assert runs["sub-03_dir-AP"].reverse_pe is None
    assert "another grid" in caplog.text
    assert runs["sub-04_dir-AP"].reverse_pe is None and runs["sub-04_dir-AP"].t1w is None
    assert runs["sub-07_ses-1_dir-AP"].reverse_pe is None
    assert runs["sub-07_ses-1_dir-AP"].t1w is not None  # the session-less T1w
    assert runs["sub-08_dir-AP"].reverse_pe is None and "no .bval" in caplog.text


def test_ignore_fieldmaps(pepolar):
    runs = bids.collect_runs(bids.load_layout(pepolar), ignore_fieldmaps=True)
    assert all(r.reverse_pe is None for r in runs)
    assert runs[0].phase_encoding == "j-"


def test_fieldmap_names_fold_dir_into_acq():
    path = bids.derivative_path(run_with(subject="01", direction="AP"), datatype="fmap",
                                desc="sdc", suffix="fieldmap")
    assert path.as_posix() == "sub-01/fmap/sub-01_acq-dirAP_space-dwi_desc-sdc_fieldmap.nii.gz"
