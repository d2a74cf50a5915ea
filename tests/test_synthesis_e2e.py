"""Participant level end to end with synthesis: phantom and real xa30 data, tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_deepanat import dmri
from bids_deepanat.bids import run_validator
from bids_deepanat.cli.run import main
from bids_deepanat.nn.checkpoint import save_model
from bids_deepanat.nn.unet import UNet3D
from bids_deepanat.synthesis import synthesize_t1w

pytestmark = pytest.mark.integration
XA30 = Path(__file__).resolve().parents[1] / "data" / "xa30"


def tiny_model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = UNet3D(in_channels=11, depth=2, base_filters=4)
    return save_model(path, model, intensity_scale=(500.0, 80.0), name=f"tiny-{seed}",
                      training={"note": "untrained, for tests"})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return tiny_model(folder / "a.safetensors", 0), tiny_model(folder / "b.safetensors", 1)


@pytest.fixture(scope="module")
def synth_run(tiny_phantom, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "out"
    code = main([str(tiny_phantom), str(out), "participant", "--model", str(models[0]),
                 "--nprocs", "2", "--save-maps", "--skip-bids-validation"])
    return dict(code=code, out=out, bids=tiny_phantom)


def synth_path(out: Path, sub: str) -> Path:
    return out / f"sub-{sub}" / "anat" / f"sub-{sub}_space-dwi_desc-synth_T1w.nii.gz"


def test_exit_zero_and_synth_named_as_spec(synth_run):
    assert synth_run["code"] == 0
    for sub in ("01", "02"):
        assert synth_path(synth_run["out"], sub).is_file()
        assert synth_path(synth_run["out"], sub).with_name(
            f"sub-{sub}_space-dwi_desc-synth_T1w.json").is_file()


def test_synth_on_the_dwi_grid_zero_outside_the_mask(synth_run):
    out, bids = synth_run["out"], synth_run["bids"]
    dwi = nib.load(bids / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    img = nib.load(synth_path(out, "01"))
    data = np.asarray(img.dataobj)
    mask = np.asarray(nib.load(out / "sub-01" / "dwi" /
                               "sub-01_space-dwi_desc-brain_mask.nii.gz").dataobj) > 0
    assert img.shape == dwi.shape[:3]
    np.testing.assert_allclose(img.affine, dwi.affine)
    assert np.isfinite(data).all()
    assert not data[~mask].any()
    assert np.std(data[mask]) > 0


def test_sidecar_fields(synth_run, models):
    meta = json.loads(synth_path(synth_run["out"], "01").with_name(
        "sub-01_space-dwi_desc-synth_T1w.json").read_text())
    assert meta["SkullStripped"] is True and meta["Description"]
    assert meta["Sources"][0] == "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"
    assert meta["SpatialReference"] == "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"
    assert meta["ModelName"] == "tiny-0"
    assert len(meta["ModelSHA256"]) == 64
    assert meta["IntensityScale"]["Mean"] == 500.0
    assert meta["IntensityScale"]["StandardDeviation"] == 80.0


def test_synth_equals_the_library_function(synth_run, models):
    """The workflow's image is what synthesize_t1w makes from the written maps: deterministic."""
    out = synth_run["out"]
    folder = out / "sub-02" / "dwi"
    maps = np.stack([nib.load(folder / f"sub-02_space-dwi_desc-{c}_dwimap.nii.gz").get_fdata()
                     for c in dmri.CHANNELS], axis=-1).astype(np.float32)
    mask_img = nib.load(folder / "sub-02_space-dwi_desc-brain_mask.nii.gz")
    expected, _ = synthesize_t1w(maps, np.asarray(mask_img.dataobj) > 0, mask_img.affine,
                                 models[0], device="cpu")
    np.testing.assert_array_equal(np.asarray(nib.load(synth_path(out, "02")).dataobj), expected)


def test_output_passes_the_validator(synth_run):
    assert run_validator(synth_run["out"]) == []


def test_rerun_does_no_work_and_another_model_redoes_it(synth_run, models, caplog):
    out, bids = synth_run["out"], synth_run["bids"]
    target = synth_path(out, "01")
    stamp = target.stat().st_mtime_ns
    args = [str(bids), str(out), "participant", "--save-maps", "--skip-bids-validation",
            "--nprocs", "1"]
    assert main(args + ["--model", str(models[0])]) == 0
    assert target.stat().st_mtime_ns == stamp
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 2
    assert main(args + ["--model", str(models[1])]) == 0
    assert target.stat().st_mtime_ns != stamp
    meta = json.loads(target.with_name("sub-01_space-dwi_desc-synth_T1w.json").read_text())
    assert meta["ModelName"] == "tiny-1"


@pytest.mark.parametrize(("damage", "code", "message"), [
    ("missing", 66, "does not exist"),
    ("truncated", 65, ""),
    ("not-a-model", 65, ""),
    ("other-inputs", 65, "input channels"),
])
def test_bad_model_fails_before_any_subject(tiny_phantom, models, tmp_path, caplog, damage, code,
                                            message):
    model = tmp_path / "model.safetensors"
    if damage == "truncated":
        model.write_bytes(models[0].read_bytes()[:-500])
    elif damage == "not-a-model":
        model.write_bytes(b"{}" * 100)
    elif damage == "other-inputs":
        torch.manual_seed(0)
        save_model(model, UNet3D(in_channels=3, depth=2, base_filters=4), intensity_scale=None,
                   input_channels=("meanb0", "L1", "dwi1"))
    out = tmp_path / "out"
    assert main([str(tiny_phantom), str(out), "participant", "--model", str(model),
                 "--skip-bids-validation"]) == code
    assert not list(out.glob("sub-*"))
    assert any(message in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


@pytest.mark.slow
def test_real_xa30_both_runs(models, tmp_path):
    out = tmp_path / "out"
    bids = Path(shutil.copytree(XA30, tmp_path / "xa30"))
    assert main([str(bids), str(out), "participant", "--model", str(models[0]),
                 "--nprocs", "2"]) == 0
    for direction in ("AP", "PA"):
        name = f"sub-01_acq-dir{direction}_space-dwi_desc-synth_T1w.nii.gz"
        path = out / "sub-01" / "anat" / name
        img = nib.load(path)
        dwi = nib.load(bids / "sub-01" / "dwi" / f"sub-01_dir-{direction}_dwi.nii.gz")
        assert img.shape == dwi.shape[:3]
        np.testing.assert_allclose(img.affine, dwi.affine)
        data = np.asarray(img.dataobj)
        mask = np.asarray(nib.load(out / "sub-01" / "dwi" /
                                   f"sub-01_dir-{direction}_space-dwi_desc-brain_mask.nii.gz")
                          .dataobj) > 0
        assert np.isfinite(data).all() and not data[~mask].any()
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert any("b = 2500" in w for w in meta["Warnings"])
    assert run_validator(out) == []


@pytest.mark.slow
def test_killed_run_then_rerun(tiny_phantom, models, tmp_path):
    """SIGKILL mid-way leaves no half-written output under a final name; a rerun completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = [sys.executable, "-m", "bids_deepanat.cli.run", str(tiny_phantom), str(out),
            "participant", "--model", str(models[0]), "--save-maps", "--skip-bids-validation",
            "--nprocs", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list(out.glob("sub-*/dwi/*_dwimap.nii.gz")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for image in out.glob("sub-*/*/*.nii.gz"):
        np.asarray(nib.load(image).dataobj)  # every file under a final name is whole
    assert not (out / "sub-01" / "anat" / "sub-01_space-dwi_desc-synth_T1w.nii.gz").exists() \
        or (out / "sub-01" / "anat" / "sub-01_space-dwi_desc-synth_T1w.json").exists()
    assert main(args[3:]) == 0
    for sub in ("01", "02"):
        np.asarray(nib.load(synth_path(out, sub)).dataobj)
    assert run_validator(out) == []
