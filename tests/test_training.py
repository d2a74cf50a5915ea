"""Training (SPEC §5): splits, streamed patches, U-Net and GAN loops, resume, DDP, fine-tuning.

The cohort is the digital phantom (5 subjects, 5 mm DWI stored LAS), with the 11 maps from
``compute_maps`` and the T1w resampled onto the DWI grid through the headers; networks are tiny
(depth 2, 4 filters, 16^3 patches).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from bids_deepanat.dmri import CHANNELS, compute_maps, read_gradients
from bids_deepanat.errors import UsageError
from bids_deepanat.nn.checkpoint import load_model, read_model_info, save_model
from bids_deepanat.nn.unet import UNet3D
from bids_deepanat.training.data import (
    PatchDataset,
    PatchSampler,
    TrainingRun,
    crop_padded,
    flip_channel_order,
    load_run,
    split_by_subject,
    target_intensity_scale,
)
from bids_deepanat.training.loop import (
    TrainConfig,
    load_checkpoint,
    masked_mae,
    train,
)

TINY = {
    "depth": 2,
    "base_filters": 4,
    "patch_size": 16,
    "patches_per_run": 6,
    "validation_patches_per_run": 4,
    "discriminator_filters": 4,
    "discriminator_blocks": 2,
    "discriminator_dense": 8,
    "gan_slices_per_axis": 4,
    "lr": 1e-3,
    "device": "cpu",
    "progress": False,
    "sample_images": False,
}


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convolutions run several times faster on one thread than on two busy cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_run(out: Path, subject: str, maps: np.ndarray, mask: np.ndarray, target: np.ndarray,
               affine: np.ndarray) -> TrainingRun:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, name in enumerate(CHANNELS):
        files.append(out / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(maps[..., i].astype(np.float32), affine), files[-1])
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), out / "mask.nii.gz")
    nib.save(nib.Nifti1Image(target.astype(np.float32), affine), out / "t1w.nii.gz")
    return TrainingRun(subject, f"sub-{subject}", tuple(files), out / "mask.nii.gz",
                       out / "t1w.nii.gz")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[TrainingRun]:
    from bids_deepanat.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("cohort")
    bids = make_phantom_dataset(root / "bids", n_subjects=5, voxel_size_mm=5.0, seed=7,
                                bvals=[0.0, 0.0] + [1000.0] * 12, t1w_snr=None)
    runs = []
    for sub_dir in sorted(bids.glob("sub-*")):
        dwi = next((sub_dir / "dwi").glob("*_dwi.nii.gz"))
        stem = str(dwi)[: -len(".nii.gz")]
        bvals, bvecs = read_gradients(Path(stem + ".bval").read_text(),
                                      Path(stem + ".bvec").read_text())
        img = nib.load(dwi)
        maps = compute_maps(np.asarray(img.dataobj), img.affine, bvals, bvecs)
        t1w = nib.load(next((sub_dir / "anat").glob("*_T1w.nii.gz")))
        # T1w voxel coordinates of every DWI voxel, from the headers alone.
        vox = np.linalg.inv(t1w.affine) @ img.affine
        target = ndimage.affine_transform(np.asarray(t1w.dataobj, np.float32), vox[:3, :3],
                                          vox[:3, 3], output_shape=img.shape[:3], order=1)
        label = sub_dir.name.removeprefix("sub-")
        runs.append(_write_run(root / "runs" / label, label, maps.maps, maps.mask, target,
                               img.affine))
    return runs


def _state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Flatten every tensor in a (nested) checkpoint dictionary."""
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    walk("", state)
    return out


def _read_log(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# ----------------------------------------------------------------------------- data


def test_split_by_subject_is_deterministic_and_by_subject(cohort):
    runs = cohort + [dataclasses.replace(cohort[0], name="sub-01_run-2")]
    train_a, val_a = split_by_subject(runs, validation_fraction=0.2, seed=3)
    train_b, val_b = split_by_subject(list(reversed(runs)), validation_fraction=0.2, seed=3)
    assert {r.name for r in val_a} == {r.name for r in val_b}
    assert {r.subject for r in train_a}.isdisjoint({r.subject for r in val_a})
    assert len({r.subject for r in val_a}) == 1  # round(0.2 * 5)
    assert len(train_a) + len(val_a) == len(runs)
    seeds = {tuple(sorted(r.subject for r in split_by_subject(runs, seed=s)[1]))
             for s in range(8)}
    assert len(seeds) > 1  # the seed matters
    # Both runs of sub-01 always land on the same side.
    for s in range(8):
        train, val = split_by_subject(runs, seed=s)
        assert sum(r.subject == "01" for r in val) in (0, 2)
    train, val = split_by_subject(runs, validation_fraction=0.0)
    assert val == [] and len(train) == len(runs)
    # A small positive fraction still holds out one subject.
    assert len(split_by_subject(runs, validation_fraction=0.01)[1]) >= 1


def test_split_errors(cohort):
    with pytest.raises(UsageError, match="at least 2 subjects"):
        split_by_subject(cohort[:1], validation_fraction=0.2)
    with pytest.raises(UsageError, match="validation fraction"):
        split_by_subject(cohort, validation_fraction=1.0)
    with pytest.raises(UsageError, match="no training runs"):
        split_by_subject([])


def test_target_intensity_scale_matches_pooled_statistics(cohort):
    values = []
    for run in cohort[:3]:
        mask = np.asarray(nib.load(run.mask_file).dataobj) > 0
        values.append(np.asarray(nib.load(run.target_file).dataobj, np.float64)[mask])
    pooled = np.concatenate(values)
    mean, std = target_intensity_scale(cohort[:3])
    assert mean == pytest.approx(pooled.mean(), rel=1e-9)
    assert std == pytest.approx(pooled.std(), rel=1e-9)


def test_load_run_reorients_and_normalizes(cohort, tmp_path):
    run = cohort[0]
    vol = load_run(run)
    assert nib.aff2axcodes(nib.load(run.mask_file).affine) == ("L", "A", "S")
    assert vol.inputs.shape == (11, *vol.mask.shape) and vol.inputs.dtype == np.float32
    assert vol.target[vol.mask].mean() == pytest.approx(0.0, abs=1e-4)
    assert vol.target[vol.mask].std() == pytest.approx(1.0, rel=1e-3)
    assert not vol.target[~vol.mask].any() and not vol.inputs[:, ~vol.mask].any()
    # The same data stored RAS gives the same canonical arrays.
    ras = []
    for path in (*run.map_files, run.mask_file, run.target_file):
        img = nib.as_closest_canonical(nib.load(path))
        ras.append(tmp_path / path.name)
        nib.save(img, ras[-1])
    ras_run = TrainingRun("01", "ras", tuple(ras[:11]), ras[11], ras[12])
    ras_vol = load_run(ras_run)
    assert np.array_equal(ras_vol.inputs, vol.inputs)
    assert np.array_equal(ras_vol.target, vol.target)


def test_flip_swaps_mirrored_dwi_channels():
    order = flip_channel_order(CHANNELS)
    names = [CHANNELS[i] for i in order]
    assert names == ["meanb0", "meandwi", "L1", "L2", "L3",
                     "dwi4", "dwi2", "dwi6", "dwi1", "dwi5", "dwi3"]


def test_crop_padded():
    a = np.arange(27, dtype=np.float32).reshape(1, 3, 3, 3) + 1
    out = crop_padded(a, (-1, -1, -1), 5)
    assert out.shape == (1, 5, 5, 5)
    assert np.array_equal(out[:, 1:4, 1:4, 1:4], a) and out.sum() == a.sum()
    assert not crop_padded(a, (10, 0, 0), 2).any()


def test_patches_are_deterministic_and_inside_the_brain(cohort):
    runs = cohort[:3]
    ds = PatchDataset(runs, patch_size=16, patches_per_run=4, seed=5)
    again = PatchDataset(runs, patch_size=16, patches_per_run=4, seed=5)
    assert len(ds) == 12
    plans = [ds.plan(e) for e in (1, 2)]
    assert sorted(map(tuple, plans[0])) == sorted(map(tuple, plans[1]))  # same draws...
    assert not np.array_equal(plans[0], plans[1])  # ...in another order
    flips = 0
    for key in [(1, 0), (1, 7), (2, 7), (3, 11)]:
        x, t, m = ds[key]
        x2, t2, m2 = again[key]  # a fresh object: no hidden state
        assert x.shape == (11, 16, 16, 16) and t.shape == m.shape == (1, 16, 16, 16)
        assert x.dtype == t.dtype == m.dtype == torch.float32
        assert torch.equal(x, x2) and torch.equal(t, t2) and torch.equal(m, m2)
        run_index, draw = ds.plan(key[0])[key[1]]
        start, flip = ds.draw(key[0], int(run_index), int(draw))
        flips += flip
        centre = 16 // 2 - 1 if flip else 16 // 2  # the flip mirrors the centre voxel
        assert m[0, centre, 8, 8] == 1  # the patch centre is brain
        vol = load_run(runs[run_index])
        expect = crop_padded(vol.inputs, start, 16)
        if flip:
            expect = expect[flip_channel_order(CHANNELS), ::-1]
        assert np.array_equal(x.numpy(), expect)
    assert not torch.equal(ds[(1, 0)][0], ds[(2, 0)][0])  # new draws every epoch
    # Validation patches do not depend on the epoch and are never flipped.
    val = PatchDataset(runs, patch_size=16, patches_per_run=2, seed=5, augment=False)
    assert torch.equal(val[(1, 3)][0], val[(9, 3)][0])
    assert not any(val.draw(0, i, k)[1] for i in range(3) for k in range(2))


def test_small_volumes_are_padded(tmp_path):
    rng = np.random.default_rng(0)
    shape = (6, 7, 5)
    mask = np.zeros(shape, bool)
    mask[1:5, 1:6, 1:4] = True
    maps = rng.normal(1.0, 0.2, (*shape, 11)).astype(np.float32)
    run = _write_run(tmp_path / "small", "x", maps, mask, rng.normal(size=shape), np.eye(4))
    x, t, m = PatchDataset([run], patch_size=16, patches_per_run=2)[(0, 1)]
    assert x.shape == (11, 16, 16, 16)
    assert m.sum() == mask.sum()


def test_dataloader_workers_give_the_same_batches(cohort):
    ds = PatchDataset(cohort[:2], patch_size=16, patches_per_run=3, seed=1)
    sampler = PatchSampler(len(ds), epoch=4, global_batch=2)
    serial = [b for b in DataLoader(ds, batch_size=2, sampler=sampler)]
    parallel = [b for b in DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2)]
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_sampler_shards_each_global_batch():
    single = list(PatchSampler(10, epoch=2, global_batch=4))
    assert single == [(2, i) for i in range(8)]  # the incomplete last batch is dropped
    shards = [list(PatchSampler(10, epoch=2, global_batch=4, rank=r, world_size=2))
              for r in range(2)]
    assert shards == [[(2, 0), (2, 1), (2, 4), (2, 5)], [(2, 2), (2, 3), (2, 6), (2, 7)]]
    with pytest.raises(UsageError, match="divisible"):
        PatchSampler(10, epoch=0, global_batch=3, world_size=2)


def test_masked_mae_is_per_sample():
    pred = torch.zeros(2, 1, 2, 2, 2)
    target = torch.ones(2, 1, 2, 2, 2)
    mask = torch.zeros(2, 1, 2, 2, 2)
    mask[0] = 1
    mask[1, 0, 0] = 1
    assert torch.allclose(masked_mae(pred, target, mask), torch.tensor([1.0, 0.5]))


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def unet_run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("unet")
    final = train(cohort, tiny_config(epochs=4, sample_images=True), out)
    return out, final


def test_unet_training_lowers_validation_loss(unet_run):
    out, final = unet_run
    assert final == out / "models" / "deepanat.safetensors"
    info = read_model_info(final)
    summary = info.training
    history = summary["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2, 3, 4]
    assert summary["best_validation_loss"] < 0.95 * summary["initial_validation_loss"]
    assert summary["best_epoch"] in range(1, 5)
    assert len(summary["subjects"]["validation"]) == 1
    assert len(summary["subjects"]["train"]) == 4
    assert summary["config"]["architecture"] == "unet"
    mean, std = info.intensity_scale
    assert std > 0 and math.isfinite(mean)
    model, _ = load_model(final)
    assert model.config() == {"in_channels": 11, "out_channels": 1, "depth": 2,
                              "base_filters": 4}


def test_training_writes_its_files(unet_run):
    out, _ = unet_run
    rows = _read_log(out / "training_log.tsv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[0]["train_loss"] == "n/a" and float(rows[1]["train_loss"]) > 0
    assert all(float(r["val_loss"]) > 0 for r in rows)
    assert float(rows[1]["lr"]) == pytest.approx(1e-3)
    for png in ["loss_curves.png", *(f"figures/validation_epoch-00{e}.png" for e in range(1, 5))]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert last["epoch"] == 4 and best["epoch"] == best["best_epoch"]
    assert isinstance(last["rng"]["torch"], torch.Tensor)
    assert {"generator", "optimizer", "scaler", "config", "history"} <= set(last)
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing behind
    # The model file holds the best epoch's weights.
    model, _ = load_model(out / "models" / "deepanat.safetensors")
    assert all(torch.equal(v, best["generator"][k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_gan_training_lowers_validation_loss(cohort, tmp_path):
    final = train(cohort, tiny_config(architecture="gan", epochs=4), tmp_path)
    summary = read_model_info(final).training
    assert summary["best_validation_loss"] < 0.95 * summary["initial_validation_loss"]
    rows = _read_log(tmp_path / "training_log.tsv")
    assert all(float(r["train_discriminator"]) > 0 for r in rows[1:])
    assert all(float(r["train_adversarial"]) > 0 for r in rows[1:])
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert {"discriminator", "optimizer_discriminator"} <= set(last)


@pytest.mark.parametrize("architecture", ["unet", "gan"])
def test_resume_gives_identical_weights(cohort, tmp_path, architecture):
    runs = cohort[:3]
    config = tiny_config(architecture=architecture, patches_per_run=4,
                         validation_patches_per_run=2)
    train(runs, dataclasses.replace(config, epochs=2), tmp_path / "straight")
    train(runs, dataclasses.replace(config, epochs=1), tmp_path / "split")
    train(runs, dataclasses.replace(config, epochs=2, resume=True), tmp_path / "split")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    # The saved RNG state is the calling process's, which training never draws from.
    ta, tb = (_state_tensors({k: v for k, v in c.items() if k != "rng"}) for c in (a, b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]
    assert len(_read_log(tmp_path / "split" / "training_log.tsv")) == 3


def test_workers_and_no_validation(cohort, tmp_path):
    runs = cohort[:3]
    config = tiny_config(epochs=1, patches_per_run=4, validation_fraction=0.0)
    train(runs, config, tmp_path / "serial")
    train(runs, dataclasses.replace(config, num_workers=2), tmp_path / "workers")
    a = load_checkpoint(tmp_path / "serial" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "workers" / "checkpoints" / "last.pt")
    assert all(torch.equal(v, b["generator"][k]) for k, v in a["generator"].items())
    # Without validation subjects: no validation loss, the last epoch is the best.
    assert a["best_epoch"] == 1 and a["best_val_loss"] is None
    assert a["split"]["validation"] == []
    rows = _read_log(tmp_path / "serial" / "training_log.tsv")
    assert [r["val_loss"] for r in rows] == ["n/a", "n/a"]


def test_resume_errors(cohort, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        train(cohort[:3], tiny_config(resume=True), tmp_path)
    train(cohort[:3], tiny_config(epochs=1, patches_per_run=2), tmp_path)
    with pytest.raises(UsageError, match="patch_size"):
        train(cohort[:3], tiny_config(epochs=2, patches_per_run=2, patch_size=32, resume=True),
              tmp_path)


def test_fine_tuning_starts_from_the_model_file(cohort, tmp_path):
    torch.manual_seed(11)
    start = UNet3D(depth=2, base_filters=6)
    init = save_model(tmp_path / "init.safetensors", start, intensity_scale=(100.0, 20.0),
                      name="start")
    # depth/base_filters of the config are ignored: the file defines the architecture.
    config = tiny_config(init_model=init, epochs=1, depth=3, base_filters=4)
    final = train(cohort, config, tmp_path / "out")
    summary = read_model_info(final).training
    # The untrained (epoch 0) validation loss is that of the file's weights.
    _, val_runs = split_by_subject(cohort, seed=config.seed)
    val = PatchDataset(val_runs, patch_size=16, patches_per_run=4, seed=config.seed,
                       augment=False)
    start.eval()
    with torch.no_grad():
        losses = [masked_mae(start(x[None]), t[None], m[None]).item()
                  for x, t, m in (val[i] for i in range(len(val)))]
    assert summary["initial_validation_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    model, _ = load_model(final)
    assert model.config()["base_filters"] == 6 and model.config()["depth"] == 2
    assert summary["config"]["init_model"] == str(init)


def test_bad_inputs(cohort, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="at least 2 subjects"):
        train(cohort[:1], tiny_config(), tmp_path / "one")
    with pytest.raises(UsageError, match="architecture"):
        train(cohort, tiny_config(architecture="vae"), tmp_path / "x")
    with pytest.raises(UsageError, match="multiple of 2"):
        train(cohort, tiny_config(patch_size=15), tmp_path / "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="divisible by the number of processes"):
        train(cohort, tiny_config(batch_size=3), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_matches_single_process(cohort, tmp_path):
    runs = cohort[:3]
    # The reference learning rate: with 1e-3, Adam's first steps turn rounding-level gradient
    # differences of near-zero gradients into differences of ~lr in some weights.
    config = tiny_config(batch_size=2, epochs=2, patches_per_run=4,
                         validation_patches_per_run=2, lr=1e-4)
    train(runs, config, tmp_path / "single")

    spec = {
        "runs": [{"subject": r.subject, "name": r.name,
                  "map_files": [str(p) for p in r.map_files], "mask_file": str(r.mask_file),
                  "target_file": str(r.target_file)} for r in runs],
        "config": config.to_dict(),
        "output_dir": str(tmp_path / "ddp"),
        "record_dir": str(tmp_path),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", str(worker), str(tmp_path / "spec.json")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    records = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert records[1]["written"] == []  # rank 1 wrote nothing
    assert records[0]["written"] and records[0]["world_size"] == "2"
    assert records[0]["final"] == records[1]["final"]
    files = {p.relative_to(tmp_path / "ddp") for p in (tmp_path / "ddp").rglob("*")}
    files_single = {p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*")}
    assert files == files_single

    a = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    for key, value in a["generator"].items():
        torch.testing.assert_close(b["generator"][key], value, atol=1e-5, rtol=1e-4)
    for ra, rb in zip(a["history"], b["history"]):
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4)
        if "train_loss" in ra:
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("architecture", ["unet", "gan"])
def test_mixed_precision_training_on_cuda(cohort, tmp_path, architecture):
    config = tiny_config(architecture=architecture, device="cuda", amp=True, epochs=2)
    final = train(cohort, config, tmp_path)
    summary = read_model_info(final).training
    assert summary["device"] == "cuda" and summary["mixed_precision"] is not None
    assert summary["best_validation_loss"] < summary["initial_validation_loss"]
    train(cohort, dataclasses.replace(config, epochs=3, resume=True), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 3
