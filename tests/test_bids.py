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
