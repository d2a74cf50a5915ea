"""Shared fixtures: tiny BIDS trees from a dict, NIfTI factories, the tiny phantom."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# Nipype asks a web service for updates on import; tests never touch the network.
os.environ.setdefault("NIPYPE_NO_ET", "1")

DATA = Path(__file__).resolve().parents[1] / "data"


def make_tree(root: Path, files: dict[str, str | bytes | dict | None]) -> Path:
    """Write a file tree; dict values become JSON, None an empty file."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"dataset_description.json": {"Name": "test", "BIDSVersion": "1.9.0"}, **files}
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            path.write_text(json.dumps(content))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content or "")
    return root


def make_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None
                             else affine), path)
    return path


@pytest.fixture
def tree(tmp_path):
    return lambda files, name="ds": make_tree(tmp_path / name, files)


def store_as(data: np.ndarray, affine: np.ndarray, bvecs: np.ndarray, axcodes: str):
    """The same image stored with other voxel axes: data, affine and FSL b-vectors together.

    Written with nibabel and world-space geometry only, independently of the code under test.
    Returns ``(data, affine, bvecs, back)``, where ``back`` maps arrays on the new grid back.
    """
    from nibabel import orientations

    start = orientations.io_orientation(affine)
    target = orientations.axcodes2ornt(tuple(axcodes))
    transform = orientations.ornt_transform(start, target)
    new_data = orientations.apply_orientation(data, transform)
    new_affine = affine @ orientations.inv_ornt_aff(transform, data.shape[:3])

    def frame(aff):
        rot = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
        return rot, np.array([-1.0 if np.linalg.det(aff[:3, :3]) > 0 else 1.0, 1.0, 1.0])

    (rot_old, flip_old), (rot_new, flip_new) = frame(affine), frame(new_affine)
    g_world = (np.asarray(bvecs) * flip_old) @ rot_old.T
    new_bvecs = (g_world @ rot_new) * flip_new

    def back(array):
        return orientations.apply_orientation(array, orientations.ornt_transform(target, start))

    return new_data, new_affine, new_bvecs, back


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """Two tiny phantom subjects (5 mm DWI); sub-02 has no T1w. Read-only for tests: copy it."""
    from bids_deepanat.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "bids", n_subjects=2,
                                voxel_size_mm=5.0, seed=3, without_t1w=["02"])


@pytest.fixture
def phantom_copy(tiny_phantom, tmp_path) -> Path:
    """A private, writable copy of the tiny phantom, to damage in a test."""
    import shutil

    return Path(shutil.copytree(tiny_phantom, tmp_path / "bids"))
