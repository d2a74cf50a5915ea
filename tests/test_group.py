"""The whole loop through the command line: phantom -> participant (targets) -> group (train)
-> participant (synthesize with the trained model) -> group --evaluate-only."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from safetensors.torch import load_file

from bids_deepanat.cli.run import main
from bids_deepanat.phantom import make_phantom_dataset
from bids_deepanat.registration import read_itk_transform, transform_error

pytestmark = pytest.mark.integration

TRAIN = ["--unet-depth", "2", "--unet-filters", "4", "--patch-size", "16", "--lr", "1e-3",
         "--patches-per-run", "8", "--validation-fraction", "0.25", "--model-name", "tiny",
         "--skip-bids-validation", "--nprocs", "1", "--omp-nthreads", "1"]


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    bids = make_phantom_dataset(root / "bids", n_subjects=4, voxel_size_mm=5.0, seed=5,
                                without_t1w=["04"])
    out = root / "out"
    codes = {"targets": main([str(bids), str(out), "participant", "--nprocs", "2",
                              "--skip-bids-validation"])}
    codes["train"] = main([str(bids), str(out), "group", "--epochs", "3", *TRAIN])
    model = out / "group" / "models" / "tiny.safetensors"
    codes["synthesize"] = main([str(bids), str(out), "participant", "--model", str(model),
                                "--nprocs", "2", "--skip-bids-validation"])
    codes["evaluate"] = main([str(bids), str(out), "group", "--evaluate-only",
                              "--skip-bids-validation"])
    return dict(bids=bids, out=out, codes=codes, model=model)


def test_every_step_exits_zero(loop):
    assert loop["codes"] == {"targets": 0, "train": 0, "synthesize": 0, "evaluate": 0}


def test_targets_only_where_a_t1w_exists(loop):
    out = loop["out"]
    for sub in ("01", "02", "03"):
        target = out / f"sub-{sub}" / "anat" / f"sub-{sub}_space-dwi_desc-target_T1w.nii.gz"
        dwi = nib.load(loop["bids"] / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi.nii.gz")
        assert nib.load(target).shape == dwi.shape[:3]
        np.testing.assert_allclose(nib.load(target).affine, dwi.affine)
        meta = json.loads(target.with_name(target.name.replace(".nii.gz", ".json")).read_text())
        assert meta["Registration"]["MutualInformationFinal"] > \
            meta["Registration"]["MutualInformationInitial"]
        assert meta["Sources"][0] == f"bids:raw:sub-{sub}/anat/sub-{sub}_T1w.nii.gz"
    assert not (out / "sub-04" / "anat" / "sub-04_space-dwi_desc-target_T1w.nii.gz").exists()


def test_registration_recovers_the_phantom_motion(loop):
    """The written transform equals the phantom's true T1w/DWI motion to 1 mm and 1 degree."""
    errors = []
    for sub in ("01", "02", "03"):
        xfm = read_itk_transform(loop["out"] / f"sub-{sub}" / "anat" /
                                 f"sub-{sub}_from-T1w_to-dwi_mode-image_xfm.txt")
        truth = json.loads((loop["bids"] / "sourcedata" / "phantom" / f"sub-{sub}_truth.json")
                           .read_text())
        true = np.linalg.inv(np.array(truth["T1wToDwiWorld"]))  # DWI world -> T1w world
        before = transform_error(np.eye(4), true, radius_mm=70.0)
        after = transform_error(xfm, true, radius_mm=70.0)
        errors.append((before, after))
        assert after[0] < 1.0 and after[1] < 1.0, (sub, before, after)
    assert max(b[0] for b, _ in errors) > 1.0  # the motion was there to be found


def test_group_training_outputs(loop):
    group = loop["out"] / "group"
    assert loop["model"].is_file()
    assert (group / "checkpoints" / "last.pt").is_file()
    assert (group / "checkpoints" / "best.pt").is_file()
    assert (group / "loss_curves.png").stat().st_size > 1000
    log = (group / "training_log.tsv").read_text().splitlines()
    header = log[0].split("\t")
    val = [float(row.split("\t")[header.index("val_loss")]) for row in log[1:]]
    assert len(val) == 4 and min(val[1:]) < val[0]  # epoch 0 is the untrained model


def test_trained_model_synthesizes_and_is_scored(loop):
    out = loop["out"]
    for sub in ("01", "02", "03", "04"):
        assert (out / f"sub-{sub}" / "anat" / f"sub-{sub}_space-dwi_desc-synth_T1w.nii.gz"
                ).is_file()
    meta = json.loads((out / "sub-01" / "anat" / "sub-01_space-dwi_desc-synth_T1w.json")
                      .read_text())
    assert meta["ModelName"] == "tiny"
    assert set(meta["QualityMetrics"]) >= {"mae", "mse", "mse_rescaled", "psnr", "ssim"}
    rows = (out / "group" / "metrics.tsv").read_text().splitlines()
    assert rows[0].startswith("participant_id\trun\tmae") and len(rows) == 4  # 3 with targets


def test_group_without_targets_exits_66(tiny_phantom, tmp_path, caplog):
    assert main([str(tiny_phantom), str(tmp_path / "out"), "group", *TRAIN]) == 66
    assert any("run the participant level first" in r.getMessage() for r in caplog.records)


def test_empty_validation_split_is_a_usage_error(loop, tmp_path, caplog):
    code = main([str(loop["bids"]), str(loop["out"]), "group", "--participant-label", "01",
                 "--epochs", "1", *TRAIN])
    assert code == 64
    assert any("validation" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


@pytest.mark.slow
def test_torchrun_gives_the_same_weights_as_one_process(loop, tmp_path):
    """`torchrun --nproc-per-node 2` over the CLI, Gloo on the CPU, global batch 2."""
    import shutil

    results = {}
    for label, launcher in (("single", [sys.executable, "-m", "bids_deepanat.cli.run"]),
                            ("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "2", "-m", "bids_deepanat.cli.run"])):
        out = tmp_path / label
        shutil.copytree(loop["out"], out, ignore=shutil.ignore_patterns("group", "work"))
        args = [str(loop["bids"]), str(out), "group", "--epochs", "1", "--batch-size", "2",
                *TRAIN[:-4], "--nprocs", "1", "--omp-nthreads", "1", "--lr", "1e-4"]
        proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[label] = load_file(str(out / "group" / "models" / "tiny.safetensors"))
        assert len(list((out / "group" / "models").iterdir())) == 1
    for name, tensor in results["single"].items():
        np.testing.assert_allclose(results["ddp"][name].numpy(), tensor.numpy(), atol=1e-5)
