"""Stage B: the synthesized T1w of one run from its maps and a model file (SPEC §4)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from .dmri import CHANNELS, Reorientation

LOGGER = logging.getLogger(__name__)


def synthesize_t1w(
    maps: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    model_file: Path,
    *,
    channels: tuple[str, ...] = CHANNELS,
    device: str = "auto",
    tiling: str = "gaussian",
    threads: int = 1,
) -> tuple[np.ndarray, dict]:
    """Synthesized T1w (X, Y, Z) on the maps' grid, 0 outside ``mask``, and what was used.

    The network sees the maps in RAS+ voxel order, whatever the storage order of the DWI, so a
    model behaves the same on LAS, LPS or permuted files. Intensities are mapped back with the
    model's stored scale; a model without one yields z-scored values.
    """
    import torch

    from .nn.checkpoint import check_model_inputs, load_model
    from .nn.inference import predict_volume, prepare_input, to_intensity

    torch.set_num_threads(max(1, threads))
    model, info = load_model(model_file, device="cpu")
    check_model_inputs(info, channels)
    reo = Reorientation.to_ras(affine, mask.shape)
    mask_ras = reo.apply(mask)
    inputs = prepare_input(reo.apply(maps), mask_ras, channels, normalization=info.normalization)
    # A progress bar only where someone watches: a terminal, not a log file or a test.
    prediction = predict_volume(model, inputs, mask_ras, device=device, tiling=tiling,
                                progress=sys.stderr.isatty())
    scale = info.intensity_scale
    image = to_intensity(prediction, mask_ras, *scale) if scale else prediction * mask_ras
    used = {
        "ModelName": info.name,
        "ModelSHA256": info.weights_sha256,
        "IntensityScale": (
            {"Mean": scale[0], "StandardDeviation": scale[1],
             "Description": "prediction (z-scored within the mask) * StandardDeviation + Mean"}
            if scale else
            {"Description": "the model stores no intensity scale: values are z-scores"}
        ),
        "Tiling": tiling,
    }
    return reo.undo(image.astype(np.float32)), used


#: File name of the model shipped in ``bids_deepanat/data/models/`` (see its model card).
SHIPPED_MODEL = "deepanat-phantom-unet.safetensors"


def default_model_path() -> Path | None:
    """The model shipped with the package, or None when this build carries none."""
    from importlib.resources import files

    path = Path(str(files("bids_deepanat") / "data" / "models" / SHIPPED_MODEL))
    return path if path.is_file() else None
