"""Run settings: one typed object with a documented default per field (SPEC §2).

Settings come from the command line and, optionally, a YAML file (``--config``); the command line
wins. The effective settings are written next to the outputs of each run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UsageError


@dataclass
class Settings:
    bids_dir: Path
    output_dir: Path
    analysis_level: str
    #: subjects to process (with or without ``sub-``); empty: all
    participant_label: list[str] = field(default_factory=list)
    #: sessions to process (with or without ``ses-``); empty: all
    session_label: list[str] = field(default_factory=list)
    #: JSON file with PyBIDS filters, e.g. ``{"dwi": {"acquisition": "highres"}}``
    bids_filter_file: Path | None = None
    #: skip the official BIDS validator
    skip_bids_validation: bool = False
    #: PyBIDS database folder, reused between runs on large datasets
    bids_database_dir: Path | None = None
    #: Nipype working directory (default ``OUTPUT_DIR/work``, listed in ``.bidsignore``)
    work_dir: Path | None = None
    #: maximum number of processes Nipype runs at once
    nprocs: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: threads per process (numpy/BLAS, torch)
    omp_nthreads: int = 1
    #: memory limit for Nipype's scheduler, in GB (None: no limit)
    mem_gb: float | None = None
    #: write the 11 diffusion maps as derivatives
    save_maps: bool = False
    #: b-values at or below this are b=0 (s/mm²)
    b0_threshold: float = 50.0
    #: highest b-value used for the tensor fit (s/mm²)
    dti_max_bval: float = 1500.0
    #: brain mask: ``auto`` (from the mean b=0) or a NIfTI on the DWI grid
    mask: str = "auto"
    #: model file for synthesis (default: the model shipped with the package, if any)
    model: Path | None = None
    #: where the network runs: ``auto`` picks CUDA when available
    device: str = "auto"
    #: tiling of whole-brain inference: ``gaussian`` (ours) or ``deepanat`` (reference blocks)
    tiling: str = "gaussian"
    #: T1w-to-diffusion registration for training targets: ``rigid`` or ``affine``
    t1w_registration: str = "rigid"
    #: inputs to leave unused; ``fieldmaps``: no distortion correction from a reversed
    #: phase-encoding pair when registering the T1w
    ignore: list[str] = field(default_factory=list)
    #: group level: generator training mode, ``unet`` (masked MAE) or ``gan``
    architecture: str = "unet"
    #: group level: U-Net levels and base filters of a new model (reference 5 and 48)
    unet_depth: int = 5
    unet_filters: int = 48
    #: group level: fine-tune from this model file instead of starting from random weights
    init_model: Path | None = None
    #: group level: epochs, global batch size, patch edge (voxels), patches per run and epoch
    epochs: int = 30
    batch_size: int = 1
    patch_size: int = 64
    patches_per_run: int = 16
    #: group level: Adam learning rate of the generator, weight of the adversarial loss
    lr: float = 1e-4
    gan_weight: float = 1e-3
    #: group level: fraction of subjects held out for validation
    validation_fraction: float = 0.2
    #: group level: continue from the last checkpoint in ``OUTPUT_DIR/group``
    resume: bool = False
    #: group level: only aggregate metrics, no training
    evaluate_only: bool = False
    #: group level: name of the trained model (default ``deepanat-<architecture>``)
    model_name: str | None = None
    #: Nipype execution plugin
    nipype_plugin: str = "MultiProc"
    #: YAML/JSON file of plugin arguments (e.g. for SLURM)
    plugin_args: Path | None = None
    #: random seed
    seed: int = 0
    #: log verbosity: 0 warnings, 1 info, 2 debug
    verbose: int = 0

    def __post_init__(self) -> None:
        for name in ("bids_dir", "output_dir", "work_dir", "bids_filter_file",
                     "bids_database_dir", "plugin_args", "model", "init_model"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value).expanduser().absolute())
        if self.work_dir is None:
            self.work_dir = self.output_dir / "work"
        if self.nprocs < 1 or self.omp_nthreads < 1:
            raise UsageError("--nprocs and --omp-nthreads must be at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.tiling not in ("gaussian", "deepanat"):
            raise UsageError(f"--tiling must be gaussian or deepanat, not {self.tiling!r}")
        if self.architecture not in ("unet", "gan"):
            raise UsageError("--architecture must be unet or gan")
        if self.t1w_registration not in ("rigid", "affine"):
            raise UsageError("--t1w-registration must be rigid or affine")
        unknown = sorted(set(self.ignore) - {"fieldmaps"})
        if unknown:
            raise UsageError(f"--ignore takes fieldmaps, not {', '.join(unknown)}")
        if self.b0_threshold < 0 or self.dti_max_bval <= self.b0_threshold:
            raise UsageError("need 0 <= --b0-threshold < --dti-max-bval")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict:
        out = {}
        for key, value in dataclasses.asdict(self).items():
            out[key] = str(value) if isinstance(value, Path) else value
        return out

    def write(self, folder: Path) -> Path:
        """Write the effective settings as YAML; returns the file."""
        from .io import write_text_atomic

        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(folder) / f"config-{self.analysis_level}-{stamp}.yaml"
        return write_text_atomic(yaml.safe_dump(self.to_dict(), sort_keys=False), path)


def read_config_file(path: Path) -> dict:
    """Settings from a YAML file; keys use option names with dashes or underscores."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - Settings.field_names())
    if unknown:
        raise UsageError(f"{path}: unknown settings {', '.join(unknown)}")
    return data
