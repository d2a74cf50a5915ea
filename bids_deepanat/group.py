"""Group level (SPEC §2, §5): train on every run with a target, aggregate the metrics."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from .bids import DwiRun, derivative_path
from .dmri import CHANNELS
from .errors import MissingInputError
from .io import write_text_atomic
from .metrics import METRICS

LOGGER = logging.getLogger(__name__)


def training_runs(runs: list[DwiRun], output_dir: Path) -> list:
    """Runs whose participant-level outputs include a target, the mask and the 11 maps."""
    from .training.data import TrainingRun

    found = []
    for run in runs:
        target = output_dir / derivative_path(run, datatype="anat", desc="target", suffix="T1w")
        mask = output_dir / derivative_path(run, datatype="dwi", desc="brain", suffix="mask")
        maps = [output_dir / derivative_path(run, datatype="dwi", desc=c, suffix="dwimap")
                for c in CHANNELS]
        if target.is_file() and mask.is_file() and all(m.is_file() for m in maps):
            found.append(TrainingRun(subject=run.subject, name=run.name, map_files=tuple(maps),
                                     mask_file=mask, target_file=target))
    return found


def aggregate_metrics(runs: list[DwiRun], output_dir: Path) -> Path | None:
    """Collect the per-run metrics TSVs into ``group/metrics.tsv``; None when there are none."""
    rows = []
    for run in runs:
        path = output_dir / derivative_path(run, datatype="anat", desc="synth", suffix="metrics",
                                            extension=".tsv")
        if not path.is_file():
            continue
        with path.open() as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                rows.append({"participant_id": f"sub-{run.subject}", "run": run.name, **row})
    if not rows:
        return None
    columns = ["participant_id", "run", *METRICS]
    lines = ["\t".join(columns)] + ["\t".join(str(r.get(c, "n/a")) for c in columns)
                                    for r in rows]
    out = write_text_atomic("\n".join(lines) + "\n", output_dir / "group" / "metrics.tsv")
    LOGGER.info("metrics of %d run(s) in %s", len(rows), out)
    return out


def is_main_process() -> bool:
    """Under torchrun only rank 0 writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def run_group(settings, runs: list[DwiRun]) -> int:
    """Train (unless ``evaluate_only``) and aggregate metrics; returns the exit code."""
    if settings.evaluate_only:
        if aggregate_metrics(runs, settings.output_dir) is None:
            raise MissingInputError(
                f"no synthesis metrics in {settings.output_dir}: run the participant level with "
                "a model on subjects that have a T1w first"
            )
        return 0
    cohort = training_runs(runs, settings.output_dir)
    if not cohort:
        raise MissingInputError(
            f"no run in {settings.output_dir} has a training target: run the participant level "
            "first on subjects that have an acquired T1w (it writes *_desc-target_T1w and the "
            "maps)"
        )
    LOGGER.info("training on %d run(s) of %d subject(s)", len(cohort),
                len({r.subject for r in cohort}))
    from .training.loop import TrainConfig, train

    config = TrainConfig(
        architecture=settings.architecture, depth=settings.unet_depth,
        base_filters=settings.unet_filters, epochs=settings.epochs,
        batch_size=settings.batch_size, patch_size=settings.patch_size,
        patches_per_run=settings.patches_per_run, lr=settings.lr, gan_weight=settings.gan_weight,
        validation_fraction=settings.validation_fraction, seed=settings.seed,
        num_workers=max(0, min(4, settings.nprocs - 1)), device=settings.device,
        init_model=settings.init_model, resume=settings.resume,
        name=settings.model_name or f"deepanat-{settings.architecture}",
    )
    import torch

    torch.set_num_threads(settings.omp_nthreads)
    model = train(cohort, config, settings.output_dir / "group")
    if is_main_process():
        aggregate_metrics(runs, settings.output_dir)
        LOGGER.info("model written to %s", model)
    return 0
