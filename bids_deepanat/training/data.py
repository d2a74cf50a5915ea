"""Training data: subject-level splits and random brain patches streamed from disk (SPEC §5).

Every volume is reoriented to RAS+ voxel order on load (``nibabel.as_closest_canonical``), so
voxel axis 0 is always the left-right axis, whatever the storage orientation on disk; the
left-right flip augmentation then flips axis 0. Because the six synthesized DWIs ``dwi1..dwi6``
are sampled along fixed DSM6 directions, a mirrored head would have been measured with the
mirrored directions: the flip therefore also swaps the DWI channels whose directions are mirror
images of each other (``dwi1 <-> dwi4`` and ``dwi3 <-> dwi6``; :func:`flip_channel_order`).
The reference implementation flipped the arrays without this swap.

Patch sampling is a pure function of ``(seed, epoch, sample position)``: nothing depends on a
global random state, so resumed runs, DataLoader workers and DDP ranks all see exactly the
samples a single uninterrupted process would see.

Memory does not grow with the cohort: a dataset object holds at most ``cache_size`` loaded runs
(per DataLoader worker). Each epoch visits the runs in a shuffled order, in windows of
``shuffle_window`` runs whose patches are shuffled together, so that every run is loaded about
once per epoch while consecutive samples still mix several subjects.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..dmri import CHANNELS, DSM6_DIRECTIONS
from ..errors import InvalidInputError, MissingInputError, UsageError
from ..nn.inference import prepare_input

__all__ = [
    "PatchDataset",
    "PatchSampler",
    "RunVolumes",
    "TrainingRun",
    "crop_padded",
    "flip_channel_order",
    "load_run",
    "split_by_subject",
    "target_intensity_scale",
]

log = logging.getLogger(__name__)

# Stream tags keep the random draws of different purposes independent for the same seed.
_SPLIT_STREAM = 1
_ORDER_STREAM = 2
_TRAIN_PATCH_STREAM = 3
_VALIDATION_PATCH_STREAM = 4
# Grids of the maps, mask and target must agree to this many mm (affine entries).
_AFFINE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class TrainingRun:
    """One training pair on the diffusion grid.

    Attributes:
        subject: subject label; splits never separate runs of one subject.
        name: identifier of the run (e.g. the BIDS file stem), for logs.
        map_files: the 11 input maps, 3D NIfTI files in :data:`~bids_deepanat.dmri.CHANNELS`
            order, all on one grid.
        mask_file: brain mask on the same grid (nonzero = brain).
        target_file: the subject's T1w registered and resampled to the same grid.
    """

    subject: str
    name: str
    map_files: tuple[Path, ...]
    mask_file: Path
    target_file: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "map_files", tuple(Path(p) for p in self.map_files))
        object.__setattr__(self, "mask_file", Path(self.mask_file))
        object.__setattr__(self, "target_file", Path(self.target_file))
        if len(self.map_files) != len(CHANNELS):
            raise UsageError(
                f"run {self.name}: {len(self.map_files)} map files given, expected "
                f"{len(CHANNELS)} ({', '.join(CHANNELS)})"
            )


@dataclass(frozen=True)
class RunVolumes:
    """A run loaded and normalized, in RAS+ voxel order.

    Attributes:
        inputs: (11, X, Y, Z) float32 network input (:func:`prepare_input`), 0 outside the mask.
        target: (X, Y, Z) float32 T1w z-scored inside the mask, 0 outside.
        mask: (X, Y, Z) bool brain mask.
        brain: (B, 3) int32 voxel indices of the mask, the candidate patch centres.
    """

    inputs: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    brain: np.ndarray


# ----------------------------------------------------------------------------- splitting


def split_by_subject(
    runs: Sequence[TrainingRun], *, validation_fraction: float = 0.2, seed: int = 0
) -> tuple[list[TrainingRun], list[TrainingRun]]:
    """Split runs into training and validation sets by subject, deterministically from ``seed``.

    ``round(validation_fraction * n_subjects)`` subjects (at least one when the fraction is
    positive) are drawn for validation; all runs of a subject go to the same side. The result
    depends only on the set of subject labels and the seed, not on the order of ``runs``.

    Raises:
        UsageError: no runs, a fraction outside [0, 1), or a split that leaves the training or
            (for a positive fraction) the validation set empty.
    """
    if not runs:
        raise UsageError("no training runs were given")
    if not 0.0 <= validation_fraction < 1.0:
        raise UsageError(
            f"the validation fraction must be in [0, 1), got {validation_fraction}"
        )
    subjects = sorted({r.subject for r in runs})
    n_val = 0
    if validation_fraction > 0:
        n_val = max(1, int(round(validation_fraction * len(subjects))))
        if n_val >= len(subjects):
            raise UsageError(
                f"cannot hold out {n_val} of {len(subjects)} subject(s) for validation "
                f"(validation fraction {validation_fraction}) and still train: the split is "
                "by subject, so at least 2 subjects are needed (or a validation fraction of 0)"
            )
    rng = np.random.default_rng([int(seed), _SPLIT_STREAM])
    held_out = {subjects[i] for i in rng.permutation(len(subjects))[:n_val]}
    train = [r for r in runs if r.subject not in held_out]
    val = [r for r in runs if r.subject in held_out]
    return train, val


# ----------------------------------------------------------------------------- loading


def _load_canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Data (float32) and affine of a 3D NIfTI file in RAS+ voxel order."""
    if not path.is_file():
        raise MissingInputError(f"training file {path} does not exist")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt or foreign files
        raise InvalidInputError(f"cannot read training file {path}: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InvalidInputError(f"training file {path} is {data.ndim}D, expected a 3D image")
    return data, img.affine


def _check_same_grid(
    path: Path, shape: tuple[int, ...], affine: np.ndarray, ref: tuple[Path, tuple, np.ndarray]
) -> None:
    ref_path, ref_shape, ref_affine = ref
    if shape != ref_shape or not np.allclose(affine, ref_affine, atol=_AFFINE_TOLERANCE):
        raise InvalidInputError(
            f"training file {path} is not on the grid of {ref_path} "
            f"(shape {shape} vs {ref_shape}, or different affine)"
        )


def _mask_and_target(run: TrainingRun) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mask (bool) and raw target of a run, RAS+; plus the mask's affine; with checks."""
    mask_data, affine = _load_canonical(run.mask_file)
    mask = mask_data > 0
    if not mask.any():
        raise InvalidInputError(f"the brain mask {run.mask_file} is empty")
    target, t_affine = _load_canonical(run.target_file)
    _check_same_grid(run.target_file, target.shape, t_affine, (run.mask_file, mask.shape, affine))
    values = target[mask]
    if not np.isfinite(values).all():
        raise InvalidInputError(f"target {run.target_file} has non-finite values in the brain")
    return mask, target, affine, values


def load_run(run: TrainingRun) -> RunVolumes:
    """Load and normalize one run (all 13 files), reoriented to RAS+.

    Raises:
        MissingInputError: a file does not exist.
        InvalidInputError: unreadable or non-3D files, different grids, an empty mask, or
            values that cannot be normalized (non-finite, constant within the mask).
    """
    mask, target, affine, values = _mask_and_target(run)
    maps = np.empty((*mask.shape, len(CHANNELS)), dtype=np.float32)
    for i, path in enumerate(run.map_files):
        data, a = _load_canonical(path)
        _check_same_grid(path, data.shape, a, (run.mask_file, mask.shape, affine))
        maps[..., i] = data
    try:
        inputs = prepare_input(maps, mask, CHANNELS)
    except InvalidInputError as exc:
        raise InvalidInputError(f"run {run.name}: {exc}") from None
    std = float(values.std(dtype=np.float64))
    if not std > 0:
        raise InvalidInputError(f"target {run.target_file} is constant inside the brain mask")
    mean = float(values.mean(dtype=np.float64))
    target_z = np.where(mask, (target - mean) / std, 0.0).astype(np.float32)
    return RunVolumes(inputs=inputs, target=target_z, mask=mask,
                      brain=np.argwhere(mask).astype(np.int32))


def target_intensity_scale(runs: Sequence[TrainingRun]) -> tuple[float, float]:
    """Mean and (population) standard deviation of raw target intensities inside the masks.

    Streams one run at a time and merges per-run moments (Chan et al.), so memory does not grow
    with the cohort. This is the output intensity scale stored in the model file.

    Raises:
        UsageError: no runs; InvalidInputError: as for :func:`load_run`, or zero spread.
    """
    if not runs:
        raise UsageError("no training runs to compute the target intensity scale from")
    count, mean, m2 = 0, 0.0, 0.0
    for run in runs:
        _, _, _, values = _mask_and_target(run)
        v = values.astype(np.float64)
        n_b, mean_b = v.size, float(v.mean())
        m2_b = float(((v - mean_b) ** 2).sum())
        delta = mean_b - mean
        total = count + n_b
        mean += delta * n_b / total
        m2 += m2_b + delta**2 * count * n_b / total
        count = total
    std = math.sqrt(m2 / count)
    if not std > 0:
        raise InvalidInputError("the training targets are constant inside the brain masks")
    return mean, std


# ----------------------------------------------------------------------------- patches


def flip_channel_order(channels: Sequence[str] = CHANNELS) -> list[int]:
    """Channel permutation that goes with a left-right (x) flip of the volume.

    ``flipped[:, ...] = inputs[order][:, ::-1]``: scalar maps stay; each DSM6 DWI takes the
    channel measured along its direction mirrored in x (directions equal up to sign).
    """
    names = list(channels)
    dwi = [f"dwi{i + 1}" for i in range(len(DSM6_DIRECTIONS))]
    order = list(range(len(names)))
    mirrored = DSM6_DIRECTIONS * np.array([-1.0, 1.0, 1.0])
    for i, name in enumerate(dwi):
        if name not in names:
            continue
        for j, other in enumerate(dwi):
            if other in names and abs(abs(float(mirrored[i] @ DSM6_DIRECTIONS[j])) - 1) < 1e-6:
                order[names.index(name)] = names.index(other)
    return order


def crop_padded(array: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    """Cut the cube ``[start, start + size)`` from the last three axes, zero outside.

    Args:
        array: (..., X, Y, Z).
        start: voxel index of the cube's corner, may be negative or beyond the volume.
        size: edge of the cube.

    Returns:
        (..., size, size, size) copy of ``array``'s dtype.
    """
    lead = array.shape[:-3]
    out = np.zeros((*lead, size, size, size), dtype=array.dtype)
    src, dst = [], []
    for s, n in zip(start, array.shape[-3:]):
        a, b = max(s, 0), min(s + size, n)
        if a >= b:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[(..., *dst)] = array[(..., *src)]
    return out


class PatchDataset(Dataset):
    """Random ``patch_size``³ patches centred inside the brain, streamed from disk.

    Items are addressed by ``(epoch, position)`` keys (see :class:`PatchSampler`); a plain int
    ``i`` means ``(0, i)``. ``len(dataset)`` is the number of patches per epoch,
    ``len(runs) * patches_per_run``.

    Args:
        runs: the runs to sample from.
        patch_size: edge of the cubic patches.
        patches_per_run: patches drawn from each run per epoch.
        seed: seed of every random choice.
        augment: training mode: shuffle the order per epoch, draw new patch centres per epoch
            and flip left-right with probability 1/2. Without it (validation), patches are fixed
            by the seed, in run order, unflipped.
        shuffle_window: runs whose patches are shuffled together (see the module docstring).
        cache_size: loaded runs kept in memory; default ``shuffle_window``.

    Each item is ``(inputs, target, mask)``: float32 tensors of shapes (11, P, P, P),
    (1, P, P, P) and (1, P, P, P) (mask as 0/1), in RAS+ voxel order.
    """

    def __init__(
        self,
        runs: Sequence[TrainingRun],
        *,
        patch_size: int = 64,
        patches_per_run: int = 16,
        seed: int = 0,
        augment: bool = True,
        shuffle_window: int = 4,
        cache_size: int | None = None,
    ) -> None:
        if not runs:
            raise UsageError("a patch dataset needs at least one run")
        if patch_size < 1 or patches_per_run < 1 or shuffle_window < 1:
            raise UsageError("patch_size, patches_per_run and shuffle_window must be positive")
        self.runs = list(runs)
        self.patch_size = int(patch_size)
        self.patches_per_run = int(patches_per_run)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.shuffle_window = int(shuffle_window)
        self.cache_size = int(cache_size or shuffle_window)
        self._flip_order = flip_channel_order(CHANNELS)
        self._cache: OrderedDict[int, RunVolumes] = OrderedDict()
        self._plans: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.runs) * self.patches_per_run

    def __getstate__(self) -> dict:
        # Workers start with an empty cache instead of a pickled copy of loaded volumes.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def plan(self, epoch: int) -> np.ndarray:
        """(len(self), 2) int array of (run index, draw index) in the order of the epoch."""
        key = int(epoch) if self.augment else 0
        if key not in self._plans:
            n_runs, k = len(self.runs), self.patches_per_run
            if not self.augment:
                plan = np.stack(np.meshgrid(np.arange(n_runs), np.arange(k), indexing="ij"),
                                axis=-1).reshape(-1, 2)
            else:
                rng = np.random.default_rng([self.seed, _ORDER_STREAM, key])
                order = rng.permutation(n_runs)
                chunks = []
                for lo in range(0, n_runs, self.shuffle_window):
                    window = order[lo : lo + self.shuffle_window]
                    pairs = np.stack(np.meshgrid(window, np.arange(k), indexing="ij"),
                                     axis=-1).reshape(-1, 2)
                    chunks.append(pairs[rng.permutation(len(pairs))])
                plan = np.concatenate(chunks)
            self._plans = {key: plan}  # only the current epoch is ever needed
        return self._plans[key]

    def volumes(self, index: int) -> RunVolumes:
        """The loaded run ``index``, from the cache or from disk."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        vol = load_run(self.runs[index])
        self._cache[index] = vol
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return vol

    def draw(self, epoch: int, run_index: int, draw_index: int) -> tuple[np.ndarray, bool]:
        """Patch corner (3,) and flip decision for one draw; a pure function of its arguments."""
        vol = self.volumes(run_index)
        if self.augment:
            key = [self.seed, _TRAIN_PATCH_STREAM, int(epoch), run_index, draw_index]
        else:
            key = [self.seed, _VALIDATION_PATCH_STREAM, run_index, draw_index]
        rng = np.random.default_rng(key)
        centre = vol.brain[rng.integers(len(vol.brain))].astype(np.int64)
        flip = bool(self.augment and rng.integers(2))
        return centre - self.patch_size // 2, flip

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, position = (0, key) if isinstance(key, int) else (int(key[0]), int(key[1]))
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} out of range for {len(self)} patches")
        run_index, draw_index = (int(v) for v in self.plan(epoch)[position])
        start, flip = self.draw(epoch, run_index, draw_index)
        vol = self.volumes(run_index)
        p = self.patch_size
        inputs = crop_padded(vol.inputs, start, p)
        target = crop_padded(vol.target, start, p)[None]
        mask = crop_padded(vol.mask, start, p)[None].astype(np.float32)
        if flip:
            inputs = inputs[self._flip_order, ::-1]
            target, mask = target[:, ::-1], mask[:, ::-1]
        return (
            torch.from_numpy(np.ascontiguousarray(inputs)),
            torch.from_numpy(np.ascontiguousarray(target)),
            torch.from_numpy(np.ascontiguousarray(mask)),
        )


class PatchSampler(Sampler):
    """Yields the ``(epoch, position)`` keys of one rank's share of every global batch.

    Global batch ``s`` holds positions ``[s * B, (s + 1) * B)`` of the epoch's plan, with
    ``B = global_batch``; rank ``r`` of ``world_size`` takes the ``r``-th contiguous slice of
    ``B / world_size`` of them. Incomplete last batches are dropped so that all ranks take the
    same number of steps.
    """

    def __init__(
        self, n_items: int, *, epoch: int, global_batch: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if global_batch % world_size:
            raise UsageError(
                f"batch size {global_batch} is not divisible by the world size {world_size}"
            )
        self.n_items = n_items
        self.epoch = epoch
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size

    @property
    def steps(self) -> int:
        return self.n_items // self.global_batch

    def __len__(self) -> int:
        return self.steps * (self.global_batch // self.world_size)

    def __iter__(self):
        local = self.global_batch // self.world_size
        for step in range(self.steps):
            first = step * self.global_batch + self.rank * local
            for position in range(first, first + local):
                yield (self.epoch, position)
