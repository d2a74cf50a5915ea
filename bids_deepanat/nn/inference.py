"""Whole-volume inference with the DeepAnat generator (SPEC §1, §4).

Three steps: :func:`prepare_input` normalizes the 11 diffusion maps, :func:`predict_volume`
runs the network over the brain in tiles and returns the z-scored T1w prediction, and
:func:`to_intensity` maps it back to intensities with the model's reference scale.

Two tiling schemes:

``"gaussian"`` (default)
    Overlapping tiles over the brain bounding box, blended with Gaussian weights that favour
    tile centres (where the network sees the most context). The tile size is chosen from the
    available memory unless given, so the whole brain is usually one tile on a large GPU.
``"deepanat"``
    The reference scheme of Li et al.: 64^3 blocks over the brain bounding box, with
    ``ceil(extent / 64) + 5`` evenly spaced (rounded) start positions per axis from the bounding
    box start to its end minus 63; each block loses 3 voxels at faces that are not on the outer
    boundary of the block grid; the blocks are averaged and the result multiplied by the mask.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..dmri import CHANNELS
from ..errors import InvalidInputError
from .checkpoint import DEFAULT_NORMALIZATION

__all__ = [
    "choose_tile_size",
    "deepanat_block_starts",
    "gaussian_weights",
    "predict_volume",
    "prepare_input",
    "to_intensity",
]

log = logging.getLogger(__name__)

#: Factor from the eigenvalue unit of bids_deepanat.dmri (µm²/ms) to the unit a model expects.
_EIGENVALUE_UNITS = {"um2/ms": 1.0, "mm2/s": 1e-3}

#: Activation memory of UNet3D per voxel of a tile and per base filter, in elements (measured
#: ~10 on CPU in float32; rounded up for allocator slack and convolution workspaces).
_ELEMENTS_PER_VOXEL_PER_FILTER = 16
_TILE_CAP = 256


def prepare_input(
    maps: np.ndarray,
    mask: np.ndarray,
    channels: Sequence[str] = CHANNELS,
    *,
    normalization: dict[str, Any] | None = None,
) -> np.ndarray:
    """Normalize diffusion maps for the network.

    Args:
        maps: (X, Y, Z, C) array of the input maps, last axis ordered as ``channels``;
            eigenvalues in µm²/ms as :mod:`bids_deepanat.dmri` computes them.
        mask: (X, Y, Z) brain mask (nonzero = brain).
        channels: names of the maps, e.g. ``bids_deepanat.dmri.CHANNELS``.
        normalization: rules as stored in a model file (``ModelInfo.normalization``); defaults
            to the DeepAnat rules: meanb0, meandwi and dwi1..dwi6 z-scored with the mean and
            (population) standard deviation inside the mask, L1..L3 left in physical units
            (converted to the model's ``units`` where it declares mm2/s).

    Returns:
        (C, X, Y, Z) float32 array, 0 outside the mask.

    Raises:
        ValueError: shapes do not fit, or a channel has no normalization rule.
        InvalidInputError: empty mask, non-finite values in the brain, or a z-scored channel
            that is constant inside the mask.
    """
    rules = DEFAULT_NORMALIZATION if normalization is None else normalization
    zscored = set(rules.get("zscore_within_mask", []))
    physical = set(rules.get("physical_units", []))
    ddof = int(rules.get("std_ddof", 0))
    units = dict(rules.get("units", {}))
    bad_units = {c: u for c, u in units.items() if u not in _EIGENVALUE_UNITS}
    if bad_units:
        raise ValueError(f"unknown units {bad_units}; known: {', '.join(_EIGENVALUE_UNITS)}")
    maps = np.asarray(maps)
    mask = np.asarray(mask).astype(bool)
    if maps.ndim != 4 or maps.shape[-1] != len(channels):
        raise ValueError(
            f"maps must be (X, Y, Z, {len(channels)}) for channels {list(channels)}, "
            f"got shape {maps.shape}"
        )
    if mask.shape != maps.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} does not match maps {maps.shape[:3]}")
    unknown = [c for c in channels if c not in zscored and c not in physical]
    if unknown:
        raise ValueError(f"no normalization rule for channel(s) {unknown}")
    n_brain = int(mask.sum())
    if n_brain == 0:
        raise InvalidInputError("the brain mask is empty")

    out = np.zeros((len(channels), *mask.shape), dtype=np.float32)
    for i, name in enumerate(channels):
        values = maps[..., i][mask].astype(np.float64)
        if not np.isfinite(values).all():
            raise InvalidInputError(
                f"input map {name} has {int((~np.isfinite(values)).sum())} non-finite values "
                "inside the brain mask"
            )
        if name in zscored:
            mean = values.mean()
            std = values.std(ddof=ddof) if n_brain > ddof else 0.0
            if not std > 0:
                raise InvalidInputError(f"input map {name} is constant inside the brain mask")
            values = (values - mean) / std
        elif name in units:
            values = values * _EIGENVALUE_UNITS[units[name]]
        out[i][mask] = values
    return out


def to_intensity(pred: np.ndarray, mask: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Map a z-scored prediction to intensities, ``(pred * std + mean) * mask``, as float32."""
    pred = np.asarray(pred, dtype=np.float32)
    mask = np.asarray(mask).astype(bool)
    if pred.shape != mask.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match mask {mask.shape}")
    if not (std > 0 and math.isfinite(mean) and math.isfinite(std)):
        raise ValueError(f"need a finite mean and std > 0, got {mean}, {std}")
    return np.where(mask, pred * np.float32(std) + np.float32(mean), np.float32(0)).astype(
        np.float32
    )


def gaussian_weights(shape: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian blending weights centred on the tile, max 1, never below 1e-3.

    ``sigma = sigma_scale * size`` per axis; the floor keeps every voxel covered with some
    weight so that voxels seen by only one tile's edge are still defined.
    """
    w = np.ones((), dtype=np.float64)
    for n in shape:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        sigma = max(sigma_scale * n, 1e-6)
        w = np.multiply.outer(w, np.exp(-0.5 * (x / sigma) ** 2))
    w /= w.max()
    return np.maximum(w, 1e-3).astype(np.float32)


def deepanat_block_starts(lo: int, hi: int, block: int = 64, extra: int = 5) -> list[int]:
    """Block start positions along one axis in the reference scheme.

    ``lo``..``hi`` is the inclusive index range of the brain along the axis. There are
    ``ceil((hi - lo + 1) / block) + extra`` starts, evenly spaced from ``lo`` to
    ``hi - block + 1`` and rounded half to even (``numpy.round``), duplicates kept. For a brain
    narrower than a block the starts run backwards from ``lo``, so every block still covers it.
    """
    n = int(math.ceil((hi - lo + 1) / block)) + extra
    return [int(s) for s in np.round(np.linspace(lo, hi - block + 1, n))]


def _device_memory(device: torch.device) -> int:
    """Total memory of the device, in bytes.

    Total, not currently free: the tile size, and so the blending, must not depend on what else
    runs at the moment, or the same input, model and device could give different outputs. An
    out-of-memory error is handled by retrying with smaller tiles instead.
    """
    if device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        return int(total)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def choose_tile_size(
    model: nn.Module, device: str | torch.device = "cpu", *, memory: int | None = None
) -> int:
    """Largest cubic tile edge (a multiple of the model's divisor, at most 256) that fits.

    Uses half the GPU memory, or a quarter of the RAM on CPU (totals, see
    :func:`_device_memory`), and an estimate of the activation memory of
    :class:`~bids_deepanat.nn.unet.UNet3D` per voxel.
    """
    device = torch.device(device)
    div = _divisor(model)
    if memory is None:
        memory = _device_memory(device)
    budget = memory * (0.5 if device.type == "cuda" else 0.25)
    elem = 2 if device.type == "cuda" else 4  # autocast halves activations on CUDA
    width = int(getattr(model, "base_filters", 48))
    per_voxel = _ELEMENTS_PER_VOXEL_PER_FILTER * width * elem
    edge = int((budget / per_voxel) ** (1 / 3)) // div * div
    return max(div, min(edge, _TILE_CAP // div * div or div))


def _divisor(model: nn.Module) -> int:
    return int(getattr(model, "divisor", 1))


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}")
    return device


def _bbox(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Inclusive low and high indices of the nonzero voxels per axis."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
    return lo, hi


def _make_runner(model: nn.Module, device: torch.device, amp: bool) -> Callable:
    def context() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if device.type == "cuda":
            # Same input, model and device must give the same output (SPEC §4): no
            # benchmark-picked or nondeterministic cuDNN algorithms.
            stack.enter_context(
                torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)
            )
            if amp:
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                stack.enter_context(torch.autocast("cuda", dtype=dtype))
        return stack

    def run(tiles: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(np.stack(tiles))).to(device)
        with context():
            y = model(x)
        return y[:, 0].float().cpu().numpy()

    return run


class _Padded:
    """Zero-padded view of the input so that any window inside ``[start, stop)`` can be cut."""

    def __init__(self, inputs: np.ndarray, start: Sequence[int], stop: Sequence[int]) -> None:
        shape = inputs.shape[1:]
        self.before = [max(0, -s) for s in start]
        after = [max(0, e - n) for e, n in zip(stop, shape)]
        if any(self.before) or any(after):
            pad = [(0, 0)] + list(zip(self.before, after))
            self.data = np.pad(inputs, pad)
        else:
            self.data = inputs

    def window(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        sl = tuple(slice(s + b, s + b + n) for s, b, n in zip(start, self.before, size))
        return self.data[(slice(None), *sl)]


def _gaussian_plan(
    lo: Sequence[int], hi: Sequence[int], tile: int, div: int, overlap: float
) -> tuple[list[int], list[list[int]]]:
    """Tile shape and per-axis absolute tile starts for the Gaussian scheme.

    Starts lie on multiples of ``div`` so that every tile pools the same voxels together as a
    single pass over the whole volume would: tiles then differ from it only near their faces.
    """
    tile_shape, starts = [], []
    for a, b in zip(lo, hi):
        first = a // div * div
        length = _round_up(b + 1 - first, div)
        t = min(tile, length)
        if length == t:
            offsets = [0]
        else:
            step = max(div, int(round(t * (1 - overlap))))
            n = int(math.ceil((length - t) / step)) + 1
            offsets = sorted({int(round(o / div)) * div for o in np.linspace(0, length - t, n)})
        tile_shape.append(t)
        starts.append([first + o for o in offsets])
    return tile_shape, starts


def _predict_gaussian(
    run: Callable, inputs: np.ndarray, lo: list[int], hi: list[int], tile: int, div: int,
    overlap: float, batch: int, progress: bool,
) -> np.ndarray:
    tile_shape, starts = _gaussian_plan(lo, hi, tile, div, overlap)
    first = [s[0] for s in starts]
    stop = [s[-1] + t for s, t in zip(starts, tile_shape)]
    padded = _Padded(inputs, first, stop)
    acc = np.zeros([e - s for s, e in zip(first, stop)], dtype=np.float64)
    wsum = np.zeros_like(acc)
    weights = gaussian_weights(tile_shape).astype(np.float64)
    positions = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]
    log.debug("gaussian tiling: %d tiles of %s", len(positions), tile_shape)
    bar = tqdm(total=len(positions), desc="T1w synthesis", unit="tile", disable=not progress)
    with bar:
        for chunk in _chunks(positions, batch):
            preds = run([padded.window(pos, tile_shape) for pos in chunk])
            for pos, pred in zip(chunk, preds):
                sl = tuple(slice(p - f, p - f + t) for p, f, t in zip(pos, first, tile_shape))
                acc[sl] += weights * pred
                wsum[sl] += weights
            bar.update(len(chunk))
    return _place(acc / np.maximum(wsum, 1e-12), first, inputs.shape[1:])


def _predict_deepanat(
    run: Callable, inputs: np.ndarray, lo: list[int], hi: list[int], block: int, extra: int,
    crop: int, batch: int, progress: bool,
) -> np.ndarray:
    starts = [deepanat_block_starts(a, b, block, extra) for a, b in zip(lo, hi)]
    first = [min(s) for s in starts]
    stop = [max(s) + block for s in starts]
    for axis, (s, f, e, a, b) in enumerate(zip(starts, first, stop, lo, hi)):
        kept = np.zeros(e - f, dtype=bool)
        for p in s:
            kept[p - f + (0 if p == f else crop) : p - f + (block if p + block == e else
                                                             block - crop)] = True
        if not kept[a - f : b - f + 1].all():
            # Only possible for blocks much smaller than the reference's 64.
            raise ValueError(
                f"{block}^3 blocks cropped by {crop} leave gaps along axis {axis}; "
                "use larger blocks or a smaller crop"
            )
    padded = _Padded(inputs, first, stop)
    acc = np.zeros([e - f for f, e in zip(first, stop)], dtype=np.float64)
    count = np.zeros_like(acc)
    # Identical blocks give identical predictions: run each once, weight by its multiplicity.
    counts = [Counter(s) for s in starts]
    positions = [
        ((x, y, z), cx * cy * cz)
        for x, cx in sorted(counts[0].items())
        for y, cy in sorted(counts[1].items())
        for z, cz in sorted(counts[2].items())
    ]
    log.debug(
        "deepanat tiling: %d blocks (%d distinct) of %d^3",
        math.prod(len(s) for s in starts), len(positions), block,
    )
    bar = tqdm(total=len(positions), desc="T1w synthesis", unit="block", disable=not progress)
    with bar:
        for chunk in _chunks(positions, batch):
            preds = run([padded.window(pos, (block,) * 3) for pos, _ in chunk])
            for (pos, mult), pred in zip(chunk, preds):
                src, dst = [], []
                for p, f, e in zip(pos, first, stop):
                    a = 0 if p == f else crop  # no crop on the outer faces of the block grid
                    b = block if p + block == e else block - crop
                    src.append(slice(a, b))
                    dst.append(slice(p - f + a, p - f + b))
                acc[tuple(dst)] += mult * pred[tuple(src)]
                count[tuple(dst)] += mult
            bar.update(len(chunk))
    return _place(acc / np.where(count > 0.5, count, 1.0), first, inputs.shape[1:])


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _place(region: np.ndarray, first: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Copy the part of ``region`` (starting at absolute ``first``) inside the volume."""
    out = np.zeros(shape, dtype=np.float32)
    src, dst = [], []
    for f, r, n in zip(first, region.shape, shape):
        a, b = max(f, 0), min(f + r, n)
        dst.append(slice(a, b))
        src.append(slice(a - f, b - f))
    out[tuple(dst)] = region[tuple(src)]
    return out


def predict_volume(
    model: nn.Module,
    inputs: np.ndarray,
    mask: np.ndarray,
    *,
    device: str | torch.device = "auto",
    tiling: str = "gaussian",
    tile_size: int | None = None,
    overlap: float = 0.5,
    block_size: int = 64,
    extra_blocks: int = 5,
    crop: int = 3,
    batch_size: int | None = None,
    amp: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Predict the z-scored T1w of a whole volume.

    Args:
        model: the generator (e.g. from :func:`~bids_deepanat.nn.checkpoint.load_model`); it is
            moved to the device and put in ``eval()`` mode.
        inputs: (C, X, Y, Z) output of :func:`prepare_input`; any X, Y, Z (padded internally).
        mask: (X, Y, Z) brain mask; the prediction is 0 outside it.
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        tiling: ``"gaussian"`` or ``"deepanat"`` (see the module docstring).
        tile_size: Gaussian tile edge, a multiple of ``2 ** (depth - 1)``; ``None`` chooses it
            from the available memory (:func:`choose_tile_size`). Tiles start on multiples of
            that divisor and never exceed the brain's bounding box extended to them.
        overlap: fraction of a Gaussian tile shared with its neighbour, in [0, 1).
        block_size, extra_blocks, crop: the reference scheme's 64, 5 and 3; ``block_size`` must
            be a multiple of ``2 ** (depth - 1)``.
        batch_size: tiles per network call; ``None``: 1 for Gaussian tiles, for reference
            blocks as many as fit in memory (at most 8).
        amp: on CUDA, run under bfloat16 (or float16 where bfloat16 is unsupported) autocast.
        progress: show a tqdm progress bar over tiles (tiles done, rate, ETA).

    Returns:
        (X, Y, Z) float32 prediction (z-scored intensities), 0 outside the mask.

    Raises:
        ValueError: inconsistent shapes or settings.
        InvalidInputError: the mask is empty.

    On a CUDA out-of-memory error the batch, then (Gaussian scheme) the tile size are reduced,
    and finally the computation falls back to the CPU with a warning. The result is
    deterministic for a given device and settings.
    """
    inputs = np.asarray(inputs, dtype=np.float32)
    mask = np.asarray(mask).astype(bool)
    if inputs.ndim != 4:
        raise ValueError(f"inputs must be (C, X, Y, Z), got shape {inputs.shape}")
    in_ch = getattr(model, "in_channels", inputs.shape[0])
    if inputs.shape[0] != in_ch:
        raise ValueError(f"model takes {in_ch} channels, inputs have {inputs.shape[0]}")
    if mask.shape != inputs.shape[1:]:
        raise ValueError(f"mask shape {mask.shape} does not match inputs {inputs.shape[1:]}")
    if tiling not in ("gaussian", "deepanat"):
        raise ValueError(f"tiling must be 'gaussian' or 'deepanat', got {tiling!r}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    div = _divisor(model)
    if tiling == "deepanat":
        if block_size < div or block_size % div:
            raise ValueError(f"block_size {block_size} must be a positive multiple of {div}")
        if extra_blocks < 0 or not 0 <= 2 * crop < block_size:
            raise ValueError("extra_blocks must be >= 0 and 0 <= crop < block_size / 2")
    if tile_size is not None and (tile_size < div or tile_size % div):
        raise ValueError(f"tile_size {tile_size} must be a positive multiple of {div}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not mask.any():
        raise InvalidInputError("the brain mask is empty")

    dev = _resolve_device(device)
    lo, hi = _bbox(mask)
    model.eval()
    tile, batch = tile_size, batch_size
    while True:
        model.to(dev)
        if tiling == "gaussian":
            tile = tile or choose_tile_size(model, dev)
            batch = batch or 1
        else:
            fits = (choose_tile_size(model, dev) // block_size) ** 3
            batch = batch or max(1, min(8, fits))
        run = _make_runner(model, dev, amp)
        try:
            if tiling == "gaussian":
                pred = _predict_gaussian(run, inputs, lo, hi, tile, div, overlap, batch, progress)
            else:
                pred = _predict_deepanat(
                    run, inputs, lo, hi, block_size, extra_blocks, crop, batch, progress
                )
            break
        except torch.OutOfMemoryError:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            smaller = (tile * 3 // 4) // div * div if tile else 0
            if batch > 1:
                log.info("out of memory on %s with %d tiles per call; trying %d", dev, batch,
                         batch // 2)
                batch //= 2
            elif tiling == "gaussian" and smaller >= max(2 * div, 16):
                log.info("out of memory on %s with %d^3 tiles; trying %d^3", dev, tile, smaller)
                tile = smaller
            elif dev.type != "cpu":
                log.warning("out of GPU memory even with small tiles; falling back to the CPU")
                dev = torch.device("cpu")
                tile, batch = tile_size, batch_size
            else:
                raise
    model.to(dev)
    return np.where(mask, pred, np.float32(0)).astype(np.float32)
