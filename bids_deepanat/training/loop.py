"""Training the DeepAnat generator, alone (U-Net) or with a 2D discriminator (GAN) (SPEC §5).

Losses, per sample ``i`` of a batch, on z-scored intensities:

- ``mae_i = mean over the voxels of the patch of mask * |prediction - target|``, as the
  reference's ``mean_absolute_error_weighted`` (normalized by the patch size, not by the number
  of brain voxels, so patches with little brain weigh less);
- GAN only: slices are cut along the three axes of the patch (all ``P`` per axis by default);
  slices with less than :data:`MIN_SLICE_BRAIN_FRACTION` brain are ignored, as the reference
  ignored nearly empty slices; ``adv_i`` is the mean binary cross-entropy of the discriminator
  labelling the generated slices "real", and the generator minimizes ``mae_i + λ adv_i``; the
  discriminator minimizes ``(bce(real slices, 1) + bce(generated slices, 0)) / 2`` per sample.
  Cross-entropies are computed from logits (sigmoid + BCE in one numerically stable step).

The batch loss is the mean of the per-sample losses. Under ``torchrun`` every rank computes the
mean over its equal share of the global batch and DistributedDataParallel averages gradients
over ranks, so the update equals that of one process with the whole global batch (exactly up to
floating-point summation order for the U-Net; for the GAN, batch normalization in the
discriminator sees per-rank batches, unless it is synchronized: we use SyncBatchNorm on CUDA).

One step of GAN training: generate; update the discriminator once on real and generated slices
(the reference ran three Keras epochs over them per step); update the generator against the
updated discriminator.

Files written by rank 0 only, each atomically (temporary file, then ``os.replace``):

- ``models/<name>.safetensors``: the generator of the best validation epoch, with the target
  intensity scale and a training summary (:func:`~bids_deepanat.nn.checkpoint.save_model`);
- ``checkpoints/last.pt`` (every epoch) and ``checkpoints/best.pt``: dictionaries of state
  dicts, tensors and plain values, readable with ``torch.load(..., weights_only=True)``;
- ``training_log.tsv``, ``loss_curves.png`` and ``figures/validation_epoch-NNN.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import UsageError
from ..nn.checkpoint import build_model, load_model, save_model
from ..nn.discriminator import SRGANDiscriminator2D, orthogonal_slices
from ..nn.unet import UNet3D
from .data import (
    PatchDataset,
    PatchSampler,
    TrainingRun,
    split_by_subject,
    target_intensity_scale,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "MIN_SLICE_BRAIN_FRACTION",
    "TrainConfig",
    "adversarial_loss",
    "load_checkpoint",
    "masked_mae",
    "train",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "bids-deepanat-training-checkpoint"
CHECKPOINT_VERSION = 1
#: Slices with a smaller brain fraction do not enter the adversarial losses.
MIN_SLICE_BRAIN_FRACTION = 0.05
_ARCHITECTURES = ("unet", "gan")
_DEVICES = ("auto", "cpu", "cuda")
# Settings that change the result: a resumed run must use the same ones.
_RESULT_FIELDS = (
    "architecture", "depth", "base_filters", "batch_size", "patch_size", "patches_per_run",
    "validation_patches_per_run", "lr", "lr_discriminator", "gan_weight",
    "discriminator_filters", "discriminator_blocks", "discriminator_dense",
    "gan_slices_per_axis", "validation_fraction", "seed", "shuffle_window",
)


@dataclass
class TrainConfig:
    """Settings of a training run; defaults are those of the reference (SPEC §1, §5).

    Attributes:
        architecture: ``"unet"`` (mask-weighted MAE) or ``"gan"`` (MAE + λ·adversarial).
        depth, base_filters: generator size (reference 5, 48); ignored with ``init_model``
            or ``resume``, which take the architecture from the file.
        epochs: total number of epochs (a resumed run continues up to this number).
        batch_size: global batch size (over all ranks under torchrun).
        patch_size: edge of the cubic training patches (multiple of ``2 ** (depth - 1)``).
        patches_per_run: random patches drawn per training run and epoch.
        validation_patches_per_run: fixed patches per validation run.
        lr, lr_discriminator: Adam learning rates of generator and discriminator.
        gan_weight: λ, weight of the adversarial loss.
        discriminator_filters, discriminator_blocks, discriminator_dense: discriminator size
            (reference 64, 4, 1024).
        gan_slices_per_axis: slices cut per axis of each patch for the discriminator, evenly
            spaced; ``None`` for all (the reference).
        validation_fraction: fraction of subjects held out (at least one when positive).
        seed: seed of the split, the initial weights and every patch draw.
        num_workers: DataLoader worker processes.
        shuffle_window: runs whose patches are shuffled together (and kept in memory).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        amp: mixed precision (bfloat16, or float16 with loss scaling) on CUDA; no effect on CPU.
        init_model: fine-tune from this model file (weights and architecture).
        resume: continue from ``checkpoints/last.pt`` in the output folder.
        name: model name, also the file name ``models/<name>.safetensors``.
        progress: show a progress bar; ``None``: when stderr is a terminal.
        sample_images: write a validation sample mosaic every epoch.
    """

    architecture: str = "unet"
    depth: int = 5
    base_filters: int = 48
    epochs: int = 30
    batch_size: int = 1
    patch_size: int = 64
    patches_per_run: int = 16
    validation_patches_per_run: int = 8
    lr: float = 1e-4
    lr_discriminator: float = 3e-4
    gan_weight: float = 1e-3
    discriminator_filters: int = 64
    discriminator_blocks: int = 4
    discriminator_dense: int = 1024
    gan_slices_per_axis: int | None = None
    validation_fraction: float = 0.2
    seed: int = 0
    num_workers: int = 0
    shuffle_window: int = 4
    device: str = "auto"
    amp: bool = True
    init_model: Path | None = None
    resume: bool = False
    name: str = "deepanat"
    progress: bool | None = None
    sample_images: bool = True

    def __post_init__(self) -> None:
        if self.init_model is not None:
            self.init_model = Path(self.init_model)

    def validate(self) -> None:
        """Raise UsageError on settings that cannot work."""
        if self.architecture not in _ARCHITECTURES:
            raise UsageError(
                f"architecture must be one of {', '.join(_ARCHITECTURES)}, "
                f"got {self.architecture!r}"
            )
        if self.device not in _DEVICES:
            raise UsageError(f"device must be one of {', '.join(_DEVICES)}, got {self.device!r}")
        for name in ("depth", "base_filters", "epochs", "batch_size", "patch_size",
                     "patches_per_run", "validation_patches_per_run", "discriminator_filters",
                     "discriminator_blocks", "discriminator_dense", "shuffle_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.num_workers < 0:
            raise UsageError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.gan_slices_per_axis is not None and not (
            1 <= self.gan_slices_per_axis <= self.patch_size
        ):
            raise UsageError(
                f"gan_slices_per_axis must be in [1, patch_size], got {self.gan_slices_per_axis}"
            )
        for name in ("lr", "lr_discriminator"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.gan_weight >= 0:
            raise UsageError(f"gan_weight must be >= 0, got {self.gan_weight}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise UsageError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise UsageError(f"invalid model name {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dictionary of the settings."""
        out = dataclasses.asdict(self)
        out["init_model"] = None if self.init_model is None else str(self.init_model)
        return out


# ----------------------------------------------------------------------------- losses


def masked_mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mask-weighted MAE: (N, 1, X, Y, Z) x3 -> (N,), mean over all voxels."""
    return (mask * (pred - target).abs()).flatten(1).mean(dim=1)


def adversarial_loss(logits: torch.Tensor, label: float, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted binary cross-entropy of slice logits.

    Args:
        logits: (N * S,) or (N * S, 1) discriminator logits, S slices per sample.
        label: 1.0 for "real", 0.0 for "generated".
        weights: (N, S) slice weights (0 or 1).

    Returns:
        (N,) mean cross-entropy over each sample's weighted slices (0 without any).
    """
    logits = logits.float().reshape(weights.shape)
    bce = F.binary_cross_entropy_with_logits(
        logits, torch.full_like(logits, label), reduction="none"
    )
    return (bce * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _slice_positions(patch_size: int, per_axis: int | None) -> list[int] | None:
    if per_axis is None or per_axis >= patch_size:
        return None
    return [int((k + 0.5) * patch_size / per_axis) for k in range(per_axis)]


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Context:
    """Process placement: rank, world size, device, precision."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def scaler(self) -> torch.amp.GradScaler:
        # Loss scaling is only needed for float16; bfloat16 has float32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def all_mean(self, values: Sequence[float]) -> list[float]:
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def _init_context(config: TrainConfig) -> _Context:
    """Read torchrun's environment, pick the device and start the process group if needed."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if config.batch_size % world:
        raise UsageError(
            f"the batch size ({config.batch_size}) must be divisible by the number of "
            f"processes ({world}): each process takes an equal share of every batch"
        )
    want_cuda = config.device == "cuda" or (
        config.device == "auto" and torch.cuda.is_available()
    )
    if want_cuda and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but CUDA is not available")
    if want_cuda:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    amp_dtype = None
    if config.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    if world > 1 and dist.get_world_size() != world:
        raise UsageError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()}")
    return _Context(rank, world, local_rank, device, amp_dtype, owns)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ----------------------------------------------------------------------------- files


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint without unpickling code (``weights_only=True``).

    Raises:
        UsageError: missing file, or not a checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"cannot resume: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files, foreign pickles refused by weights_only, ...
        raise UsageError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a bids-deepanat training checkpoint")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise UsageError(
            f"checkpoint {path} has format version {state.get('format_version')!r}; "
            f"this version reads {CHECKPOINT_VERSION}"
        )
    return state


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.6g}"


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    columns = ["epoch", "train_loss", "val_loss", "train_mae", "train_adversarial",
               "train_discriminator", "lr", "lr_discriminator", "epoch_seconds",
               "elapsed_seconds"]
    lines = ["\t".join(columns)]
    for row in history:
        lines.append("\t".join(
            str(row["epoch"]) if c == "epoch" else _fmt(row.get(c)) for c in columns
        ))
    text = "\n".join(lines) + "\n"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    plt = _figure()
    try:
        _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def _plot_losses(path: Path, history: list[dict[str, Any]]) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "training"), ("val_loss", "validation")):
        pts = [(r["epoch"], r[key]) for r in history if _finite(r.get(key))]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (mask-weighted MAE, z-scored)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_sample(path: Path, inputs: np.ndarray, pred: np.ndarray, target: np.ndarray,
                 epoch: int) -> None:
    """3x3 mosaic: rows meanb0 input, prediction, target; columns sagittal, coronal, axial."""
    plt = _figure()
    c = [s // 2 for s in target.shape]

    def cuts(vol: np.ndarray) -> list[np.ndarray]:
        return [vol[c[0]].T, vol[:, c[1]].T, vol[:, :, c[2]].T]

    fig, axes = plt.subplots(3, 3, figsize=(7, 7))
    for row, (label, vol) in enumerate(
        (("meanb0 (input)", inputs[0]), ("prediction", pred), ("target T1w", target))
    ):
        for col, img in enumerate(cuts(vol)):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", origin="lower", vmin=-2.5, vmax=2.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle(f"validation sample, epoch {epoch} (z-scored)")
    fig.tight_layout()
    _save_figure(fig, path)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# ----------------------------------------------------------------------------- training state


@dataclass
class _State:
    """Everything a checkpoint restores."""

    generator: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    discriminator: nn.Module | None = None
    optimizer_d: torch.optim.Optimizer | None = None
    scaler_d: torch.amp.GradScaler | None = None
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    intensity_scale: tuple[float, float] | None = None


def _build_state(config: TrainConfig, ctx: _Context, checkpoint: dict | None) -> _State:
    # Same initial weights on every rank and in every run with this seed, without touching the
    # caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        state = _build_state_seeded(config, ctx, checkpoint)
    if checkpoint is not None:
        _restore(state, checkpoint, ctx)
    return state


def _build_state_seeded(config: TrainConfig, ctx: _Context, checkpoint: dict | None) -> _State:
    if checkpoint is not None:
        generator = build_model(checkpoint["generator_architecture"], checkpoint["generator_args"])
    elif config.init_model is not None:
        generator, info = load_model(config.init_model, device="cpu")
        generator.train()
        log.info("fine-tuning %s (%s %s)", info.name, info.architecture, info.architecture_args)
    else:
        generator = UNet3D(depth=config.depth, base_filters=config.base_filters)
    divisor = int(getattr(generator, "divisor", 1))
    if config.patch_size % divisor:
        raise UsageError(
            f"patch size {config.patch_size} must be a multiple of {divisor} for a generator "
            f"of depth {getattr(generator, 'depth', '?')}"
        )
    generator.to(ctx.device).train()
    state = _State(
        generator=generator,
        optimizer=torch.optim.Adam(generator.parameters(), lr=config.lr),
        scaler=ctx.scaler(),
    )
    if config.architecture == "gan":
        try:
            disc: nn.Module = SRGANDiscriminator2D(
                image_size=config.patch_size,
                base_filters=config.discriminator_filters,
                n_blocks=config.discriminator_blocks,
                dense_features=config.discriminator_dense,
            )
        except ValueError as exc:
            raise UsageError(f"discriminator: {exc}") from None
        if ctx.distributed and ctx.device.type == "cuda":
            disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        disc.to(ctx.device).train()
        state.discriminator = disc
        state.optimizer_d = torch.optim.Adam(disc.parameters(), lr=config.lr_discriminator)
        state.scaler_d = ctx.scaler()
    return state


def _restore(state: _State, ck: dict[str, Any], ctx: _Context) -> None:
    state.generator.load_state_dict(ck["generator"])
    state.optimizer.load_state_dict(ck["optimizer"])
    state.scaler.load_state_dict(ck["scaler"])
    if state.discriminator is not None:
        state.discriminator.load_state_dict(ck["discriminator"])
        state.optimizer_d.load_state_dict(ck["optimizer_discriminator"])
        state.scaler_d.load_state_dict(ck["scaler_discriminator"])
    state.epoch = int(ck["epoch"])
    state.history = [dict(r) for r in ck["history"]]
    state.best_epoch = ck["best_epoch"]
    state.best_val_loss = ck["best_val_loss"]
    scale = ck["intensity_scale"]
    state.intensity_scale = None if scale is None else (float(scale[0]), float(scale[1]))
    torch.set_rng_state(ck["rng"]["torch"])
    if ctx.device.type == "cuda" and ck["rng"]["cuda"]:
        with contextlib.suppress(RuntimeError):  # fewer GPUs than when saved
            torch.cuda.set_rng_state_all(list(ck["rng"]["cuda"]))


def _checkpoint_dict(state: _State, config: TrainConfig, split: dict[str, list[str]],
                     ctx: _Context) -> dict[str, Any]:
    generator = _unwrap(state.generator)
    out: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "epoch": state.epoch,
        "generator_architecture": "UNet3D",
        "generator_args": generator.config(),
        "generator": generator.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "scheduler": None,  # constant learning rate, as the reference
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if ctx.device.type == "cuda" else [],
        },
        "config": config.to_dict(),
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "intensity_scale": None if state.intensity_scale is None else list(state.intensity_scale),
        "split": split,
    }
    if state.discriminator is not None:
        out["discriminator"] = _unwrap(state.discriminator).state_dict()
        out["optimizer_discriminator"] = state.optimizer_d.state_dict()
        out["scaler_discriminator"] = state.scaler_d.state_dict()
    return out


def _check_resume(ck: dict[str, Any], config: TrainConfig, split: dict[str, list[str]]) -> None:
    saved = ck["config"]
    skip = {"depth", "base_filters"} if saved.get("init_model") else set()
    diff = [f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}"
            for k in _RESULT_FIELDS if k not in skip and saved.get(k) != getattr(config, k)]
    if diff:
        raise UsageError(
            "cannot resume with settings that differ from the checkpoint's: " + "; ".join(diff)
        )
    if ck["split"] != split:
        raise UsageError(
            "cannot resume: the training/validation subjects differ from the checkpoint's "
            f"(checkpoint: {ck['split']}, now: {split})"
        )


# ----------------------------------------------------------------------------- epochs


def _loader(dataset: PatchDataset, keys: Iterator | PatchSampler | list, batch: int,
            config: TrainConfig, ctx: _Context) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=keys,
        num_workers=config.num_workers,
        pin_memory=ctx.device.type == "cuda",
    )


def _step_unet(state: _State, batch: tuple[torch.Tensor, ...], ctx: _Context) -> dict[str, float]:
    x, target, mask = batch
    with ctx.autocast():
        pred = state.generator(x)
    loss = masked_mae(pred.float(), target, mask).mean()
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    value = float(loss.detach())
    return {"train_loss": value, "train_mae": value}


def _step_gan(state: _State, batch: tuple[torch.Tensor, ...], ctx: _Context,
              config: TrainConfig, positions: list[int] | None) -> dict[str, float]:
    x, target, mask = batch
    disc = state.discriminator
    with ctx.autocast():
        pred = state.generator(x)
    pred = pred.float()
    mae = masked_mae(pred, target, mask)
    # The discriminator judges the brain only, as the generator's loss does.
    fake = orthogonal_slices(pred * mask, positions)
    real = orthogonal_slices(target, positions)
    weights = orthogonal_slices(mask, positions).flatten(1).mean(dim=1)
    weights = (weights >= MIN_SLICE_BRAIN_FRACTION).float().reshape(x.shape[0], -1)
    m = real.shape[0]

    # Discriminator update: real and generated slices in one batch (shared batch statistics).
    with ctx.autocast():
        logits = disc(torch.cat([real, fake.detach()]))
    loss_d = (0.5 * (adversarial_loss(logits[:m], 1.0, weights)
                     + adversarial_loss(logits[m:], 0.0, weights))).mean()
    state.optimizer_d.zero_grad(set_to_none=True)
    state.scaler_d.scale(loss_d).backward()
    state.scaler_d.step(state.optimizer_d)
    state.scaler_d.update()

    # Generator update against the updated discriminator. The forward bypasses the DDP wrapper
    # so that no discriminator gradients are synchronized; the gradients it leaves on the
    # discriminator are discarded by the next zero_grad.
    with ctx.autocast():
        logits_g = _unwrap(disc)(fake)
    adv = adversarial_loss(logits_g, 1.0, weights)
    loss = (mae + config.gan_weight * adv).mean()
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return {
        "train_loss": float(loss.detach()),
        "train_mae": float(mae.detach().mean()),
        "train_adversarial": float(adv.detach().mean()),
        "train_discriminator": float(loss_d.detach()),
    }


def _train_epoch(state: _State, dataset: PatchDataset, epoch: int, config: TrainConfig,
                 ctx: _Context, show: bool) -> dict[str, float]:
    """One epoch (``epoch`` counts from 1); returns the mean of each logged loss."""
    sampler = PatchSampler(len(dataset), epoch=epoch, global_batch=config.batch_size,
                           rank=ctx.rank, world_size=ctx.world_size)
    local = config.batch_size // ctx.world_size
    positions = _slice_positions(config.patch_size, config.gan_slices_per_axis)
    totals: dict[str, float] = {}
    bar = tqdm(total=sampler.steps, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
               disable=not show, leave=False, dynamic_ncols=True)
    with bar:
        for batch in _loader(dataset, sampler, local, config, ctx):
            batch = tuple(t.to(ctx.device, non_blocking=True) for t in batch)
            if state.discriminator is None:
                values = _step_unet(state, batch, ctx)
            else:
                values = _step_gan(state, batch, ctx, config, positions)
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v
            bar.set_postfix(loss=f"{values['train_loss']:.4f}")
            bar.update()
    steps = max(sampler.steps, 1)
    keys = sorted(totals)
    means = ctx.all_mean([totals[k] / steps for k in keys])
    return dict(zip(keys, means))


def _validation_loss(state: _State, dataset: PatchDataset | None, config: TrainConfig,
                     ctx: _Context) -> float:
    """Mean per-patch masked MAE over the fixed validation patches (all ranks together)."""
    if dataset is None:
        return float("nan")
    generator = _unwrap(state.generator)
    keys = [(0, i) for i in range(ctx.rank, len(dataset), ctx.world_size)]
    total, count = 0.0, 0
    generator.eval()
    try:
        with torch.no_grad():
            for x, target, mask in _loader(dataset, keys, max(1, config.batch_size //
                                                              ctx.world_size), config, ctx):
                x, target, mask = (t.to(ctx.device) for t in (x, target, mask))
                with ctx.autocast():
                    pred = generator(x)
                per = masked_mae(pred.float(), target, mask).double()
                total += float(per.sum())
                count += per.numel()
    finally:
        generator.train()
    total, count = ctx.all_sum([total, count])
    return total / count


def _predict_sample(state: _State, dataset: PatchDataset, ctx: _Context
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    generator = _unwrap(state.generator)
    x, target, mask = dataset[0]
    generator.eval()
    try:
        with torch.no_grad(), ctx.autocast():
            pred = generator(x[None].to(ctx.device))
    finally:
        generator.train()
    pred = (pred.float().cpu()[0, 0] * mask[0]).numpy()
    return x.numpy(), pred, target[0].numpy()


# ----------------------------------------------------------------------------- entry point


def train(runs: list[TrainingRun], config: TrainConfig, output_dir: str | os.PathLike[str]
          ) -> Path:
    """Train a generator on ``runs`` and return the path of the final model file.

    Works alone and under ``torchrun`` (one process per device; ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` from the environment): the process group is started here (NCCL on CUDA,
    Gloo on CPU) unless it already exists, and destroyed at the end if started here. Only rank
    0 writes files; every rank returns the same path. With several ranks and ``resume``, every
    rank reads the checkpoint, so the output folder must be shared.

    Raises:
        UsageError: bad settings, an empty split, a batch size not divisible by the number of
            processes, ``resume`` without a usable checkpoint or with different settings.
        InvalidInputError, MissingInputError: unusable training files.
    """
    config.validate()
    output_dir = Path(output_dir)
    ctx = _init_context(config)
    try:
        return _train(list(runs), config, output_dir, ctx)
    finally:
        ctx.close()


def _train(runs: list[TrainingRun], config: TrainConfig, out: Path, ctx: _Context) -> Path:
    start_time = time.perf_counter()
    train_runs, val_runs = split_by_subject(
        runs, validation_fraction=config.validation_fraction, seed=config.seed
    )
    split = {
        "train": sorted({r.subject for r in train_runs}),
        "validation": sorted({r.subject for r in val_runs}),
    }
    if ctx.is_main:
        log.info("training on %d run(s) of %d subject(s), validating on %d run(s) of %d "
                 "subject(s); %d process(es) on %s", len(train_runs), len(split["train"]),
                 len(val_runs), len(split["validation"]), ctx.world_size, ctx.device)
    ckpt_dir = out / "checkpoints"
    checkpoint = None
    if config.resume:
        checkpoint = load_checkpoint(ckpt_dir / "last.pt")
        _check_resume(checkpoint, config, split)
    state = _build_state(config, ctx, checkpoint)
    if checkpoint is not None and ctx.is_main:
        log.info("resuming after epoch %d of %d", state.epoch, config.epochs)
    del checkpoint  # the optimizer holds its own copies; free the rest
    if state.intensity_scale is None:
        # Every rank reads the targets, so that a bad file stops all of them alike instead of
        # leaving the others waiting in a collective call.
        state.intensity_scale = target_intensity_scale(train_runs)
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        state.generator = DistributedDataParallel(state.generator, device_ids=ids)
        if state.discriminator is not None:
            state.discriminator = DistributedDataParallel(state.discriminator, device_ids=ids)

    train_set = PatchDataset(train_runs, patch_size=config.patch_size,
                             patches_per_run=config.patches_per_run, seed=config.seed,
                             augment=True, shuffle_window=config.shuffle_window)
    if len(train_set) < config.batch_size:
        raise UsageError(
            f"{len(train_set)} patches per epoch is fewer than the batch size "
            f"{config.batch_size}; raise patches_per_run"
        )
    val_set = None
    if val_runs:
        val_set = PatchDataset(val_runs, patch_size=config.patch_size,
                               patches_per_run=config.validation_patches_per_run,
                               seed=config.seed, augment=False,
                               shuffle_window=config.shuffle_window)
    show = ctx.is_main and (sys.stderr.isatty() if config.progress is None else config.progress)

    if not state.history:
        # Epoch 0: the starting point, for the loss curves and the summary.
        val0 = _validation_loss(state, val_set, config, ctx)
        state.history.append({"epoch": 0, "val_loss": val0, "elapsed_seconds":
                              time.perf_counter() - start_time})
        if ctx.is_main:
            log.info("epoch 0: validation loss %s", _fmt(val0))
    elapsed_before = float(state.history[-1].get("elapsed_seconds") or 0.0)
    run_start = time.perf_counter()
    first_epoch = state.epoch + 1
    for epoch in range(first_epoch, config.epochs + 1):
        t0 = time.perf_counter()
        losses = _train_epoch(state, train_set, epoch, config, ctx, show)
        val = _validation_loss(state, val_set, config, ctx)
        seconds = time.perf_counter() - t0
        state.epoch = epoch
        row = {"epoch": epoch, **losses, "val_loss": val, "lr": config.lr,
               "lr_discriminator": config.lr_discriminator if state.discriminator else None,
               "epoch_seconds": seconds,
               "elapsed_seconds": elapsed_before + time.perf_counter() - run_start}
        state.history.append(row)
        # Best by validation loss; without a validation set, the latest epoch.
        improved = val_set is None or state.best_val_loss is None or val < state.best_val_loss
        if improved:
            state.best_epoch = epoch
            state.best_val_loss = val if val_set is not None else None
        if ctx.is_main:
            remaining = (time.perf_counter() - run_start) / (epoch - first_epoch + 1) * (
                config.epochs - epoch)
            log.info("epoch %d/%d: train loss %s, validation loss %s%s, %.1f s (ETA %.0f s)",
                     epoch, config.epochs, _fmt(losses.get("train_loss")), _fmt(val),
                     " (best)" if improved else "", seconds, remaining)
            _write_epoch_files(state, config, split, ctx, out, improved, val_set or train_set)
        ctx.barrier()

    final = out / "models" / f"{config.name}.safetensors"
    if ctx.is_main:
        _save_final(state, config, split, ctx, out, final)
    ctx.barrier()
    return final


def _write_epoch_files(state: _State, config: TrainConfig, split: dict[str, list[str]],
                       ctx: _Context, out: Path, improved: bool, sample_set: PatchDataset
                       ) -> None:
    ck = _checkpoint_dict(state, config, split, ctx)
    ckpt_dir = out / "checkpoints"
    _atomic_write(ckpt_dir / "last.pt", lambda tmp: torch.save(ck, tmp))
    if improved:
        _atomic_write(ckpt_dir / "best.pt", lambda tmp: torch.save(ck, tmp))
    _write_log(out / "training_log.tsv", state.history)
    _plot_losses(out / "loss_curves.png", state.history)
    if config.sample_images:
        inputs, pred, target = _predict_sample(state, sample_set, ctx)
        _plot_sample(out / "figures" / f"validation_epoch-{state.epoch:03d}.png",
                     inputs, pred, target, state.epoch)


def _save_final(state: _State, config: TrainConfig, split: dict[str, list[str]],
                ctx: _Context, out: Path, final: Path) -> None:
    """Write the best epoch's generator as the model file."""
    best_path = out / "checkpoints" / "best.pt"
    generator = _unwrap(state.generator)
    if state.best_epoch is not None and state.best_epoch != state.epoch and best_path.is_file():
        best = load_checkpoint(best_path)
        generator = build_model(best["generator_architecture"], best["generator_args"])
        generator.load_state_dict(best["generator"])
    history = [{k: (v if _finite(v) else None) if isinstance(v, float) else v
                for k, v in row.items()} for row in state.history]
    summary = {
        "method": "DeepAnat (Li et al., Medical Image Analysis 2023)",
        "architecture": config.architecture,
        "loss": "mask-weighted MAE on z-scored T1w"
                + (f" + {config.gan_weight:g} x adversarial BCE" if state.discriminator else ""),
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "best_validation_loss": state.best_val_loss,
        "initial_validation_loss": history[0].get("val_loss") if history else None,
        "history": history,
        "subjects": split,
        "config": config.to_dict(),
        "world_size": ctx.world_size,
        "device": ctx.device.type,
        "mixed_precision": None if ctx.amp_dtype is None else str(ctx.amp_dtype),
        "torch_version": torch.__version__,
    }
    save_model(final, generator, intensity_scale=state.intensity_scale, training=summary,
               name=config.name)
