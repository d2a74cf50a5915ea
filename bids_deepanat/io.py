"""Reading inputs with errors that name the file, and atomic writes of outputs."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from .dmri import read_gradients, validate_gradients
from .errors import InvalidInputError, MissingInputError


def check_gzip(path: Path) -> None:
    """Decompress a ``.gz`` file end to end: a truncated or corrupt file fails here, early."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as err:
        raise InvalidInputError(f"{path.name}: corrupt or truncated gzip file ({err})") from None


def load_nifti(path: Path, *, ndim: int | None = None, check_data: bool = False) -> nib.Nifti1Image:
    """Load a NIfTI image, turning every way it can be unreadable into one clear error."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: file not found")
    if check_data and path.name.endswith(".gz"):
        check_gzip(path)
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises many types for a non-NIfTI file
        raise InvalidInputError(f"{path.name}: not a readable NIfTI image ({err})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InvalidInputError(f"{path.name}: not a NIfTI image")
    if ndim is not None and len(img.shape) != ndim:
        raise InvalidInputError(f"{path.name}: expected a {ndim}D image, got shape {img.shape}")
    if not np.all(np.isfinite(img.affine)):
        raise InvalidInputError(f"{path.name}: the header's affine is not finite")
    return img


def load_gradients(
    dwi: Path, bval: Path | None, bvec: Path | None, n_volumes: int, *, b0_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate the gradient table of ``dwi``; errors name the offending file."""
    for kind, path in (("bval", bval), ("bvec", bvec)):
        if path is None or not Path(path).exists():
            raise MissingInputError(f"{Path(dwi).name}: no .{kind} file found for this DWI run")
    try:
        bvals, bvecs = read_gradients(Path(bval).read_text(), Path(bvec).read_text())
        validate_gradients(bvals, bvecs, n_volumes, b0_threshold=b0_threshold)
    except InvalidInputError as err:
        raise InvalidInputError(f"{Path(dwi).name} (+ .bval/.bvec): {err}") from None
    return bvals, bvecs


def check_dwi_run(dwi: Path, bval: Path | None, bvec: Path | None, *, b0_threshold: float) -> None:
    """Everything that can be wrong with a DWI run before any science is done on it."""
    img = load_nifti(dwi, ndim=4, check_data=True)
    load_gradients(dwi, bval, bvec, img.shape[3], b0_threshold=b0_threshold)


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_nifti_atomic(img: nib.spatialimages.SpatialImage, path: Path) -> Path:
    """Write an image to a temporary file beside ``path`` and rename it into place."""
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


def write_json_atomic(data: dict, path: Path) -> Path:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_text_atomic(text: str, path: Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def image_like(
    data: np.ndarray, reference: nib.Nifti1Image, *, dtype=np.float32
) -> nib.Nifti1Image:
    """A 3D image on ``reference``'s grid and header (qform/sform kept, 4th dimension dropped)."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, header)
    img.header.set_xyzt_units(*reference.header.get_xyzt_units())
    img.header["scl_slope"], img.header["scl_inter"] = np.nan, np.nan
    return img
