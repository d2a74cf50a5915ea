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
