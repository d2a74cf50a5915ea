"""PyBIDS queries, derivative naming and the derivative dataset description (SPEC §3, §8)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import InvalidDatasetError, NothingSelectedError
from .io import write_json_atomic, write_text_atomic

LOGGER = logging.getLogger(__name__)

#: Entities of a DWI run that distinguish its outputs, in BIDS filename order.
RUN_ENTITIES = ("subject", "session", "acquisition", "reconstruction", "direction", "run")
_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq", "reconstruction": "rec",
         "direction": "dir", "run": "run"}
_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` and ``01`` both mean subject ``01``."""
    label = str(label).strip()
    return label[len(prefix) + 1:] if label.startswith(f"{prefix}-") else label


@dataclass(frozen=True)
class ReversePE:
    """The reversed phase-encoding partner of a run, on the run's grid (for distortion
    correction): another DWI run of the session (its b=0 volumes are used) or an ``fmap`` EPI
    meant for the run (all its volumes are used)."""

    image: Path
    bval: Path | None
    phase_encoding: str
    readout_time: float | None = None


@dataclass(frozen=True)
class DwiRun:
    """One diffusion run and the files that go with it."""

    entities: dict  # PyBIDS long names from RUN_ENTITIES, values as strings
    dwi: Path
    bval: Path | None
    bvec: Path | None
    t1w: Path | None = None
    sidecar: Path | None = field(default=None, compare=False)
    phase_encoding: str | None = None  # BIDS PhaseEncodingDirection, e.g. ``j-``
    readout_time: float | None = None  # TotalReadoutTime (s)
    reverse_pe: ReversePE | None = None

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def name(self) -> str:
        """The run's filename stem without suffix, e.g. ``sub-01_ses-1_dir-AP``."""
        return "_".join(f"{_KEYS[k]}-{self.entities[k]}" for k in RUN_ENTITIES
                        if k in self.entities)

    @property
    def node_name(self) -> str:
        """A Nipype-safe identifier for workflows of this run."""
        return re.sub(r"[^A-Za-z0-9]", "_", self.name)


def derivative_path(
    run: DwiRun, *, datatype: str, suffix: str, extension: str = ".nii.gz",
    space: str | None = "dwi", desc: str | None = None, transform: tuple[str, str] | None = None,
) -> Path:
    """Relative path of a derivative of ``run`` (the one place output names are made).

    Anatomical and ``_fieldmap`` files cannot carry ``dir-``: it is folded into ``acq-``
    (``acq-dirAP``, or ``acq-<acq>dir<dir>``) so that every DWI run keeps its own valid name.
    """
    ent = dict(run.entities)
    if datatype in ("anat", "fmap") and "direction" in ent:
        direction = ent.pop("direction")
        ent["acquisition"] = f"{ent.get('acquisition', '')}dir{direction}"
    for key, value in ent.items():
        if not _LABEL.match(str(value)):
            raise ValueError(f"entity {key}={value!r} is not a BIDS label")
    parts = [f"{_KEYS[k]}-{ent[k]}" for k in RUN_ENTITIES if k in ent]
    if space:
        parts.append(f"space-{space}")
    if desc:
        parts.append(f"desc-{desc}")
    if transform:
        parts += [f"from-{transform[0]}", f"to-{transform[1]}", "mode-image"]
    parts.append(suffix)
    folder = Path(f"sub-{ent['subject']}")
    if "session" in ent:
        folder /= f"ses-{ent['session']}"
    return folder / datatype / ("_".join(parts) + extension)


def bids_uri(path: Path, bids_dir: Path) -> str:
    """A BIDS URI into the raw dataset, named ``raw`` in DatasetLinks."""
    return f"bids:raw:{Path(path).resolve().relative_to(Path(bids_dir).resolve()).as_posix()}"


# --------------------------------------------------------------------------- validation


def validate_dataset(bids_dir: Path, *, skip_validator: bool = False) -> None:
    """Refuse what is not a BIDS dataset; run the official validator when it is installed."""
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InvalidDatasetError(f"{bids_dir}: not a directory")
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise InvalidDatasetError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    try:
        json.loads(description.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidDatasetError(f"{description}: not valid JSON ({err})") from None
    if skip_validator:
        return
    errors = run_validator(bids_dir)
    if errors:
        shown = "; ".join(errors[:5]) + (f"; ... ({len(errors)} in all)" if len(errors) > 5 else "")
        raise InvalidDatasetError(
            f"{bids_dir}: the BIDS validator found errors: {shown} "
            "(use --skip-bids-validation to run anyway)"
        )


def validator_executable() -> str | None:
    beside = Path(sys.executable).parent / "bids-validator-deno"
    return str(beside) if beside.exists() else shutil.which("bids-validator-deno")


def run_validator(dataset: Path) -> list[str]:
    """Errors reported by ``bids-validator-deno`` (empty when it is not installed)."""
    exe = validator_executable()
    if exe is None:
        LOGGER.warning("bids-validator-deno is not installed: only basic BIDS checks were made")
        return []
    proc = subprocess.run([exe, str(dataset), "--format", "json"], capture_output=True,
                          text=True, timeout=600, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        LOGGER.warning("the BIDS validator gave no readable report: %s", proc.stderr.strip()[-300:])
        return []
    return [
        f"{issue.get('code')}: {issue.get('location', '')}".strip()
        for issue in report.get("issues", {}).get("issues", [])
        if issue.get("severity") == "error"
    ]


# --------------------------------------------------------------------------- discovery


def load_layout(bids_dir: Path, database_dir: Path | None = None):
    from bids import BIDSLayout

    kwargs = {}
    if database_dir is not None:
        kwargs["database_path"] = str(database_dir)
    return BIDSLayout(str(bids_dir), validate=False, **kwargs)


def _companion(layout, dwi: str, kind: str) -> Path | None:
    getter = layout.get_bval if kind == "bval" else layout.get_bvec
    try:
        found = getter(dwi)
    except (IndexError, ValueError):  # PyBIDS raises IndexError when nothing matches
        return None
    return Path(found) if found else None


def _find_t1w(layout, subject: str, session: str | None) -> Path | None:
    query = dict(subject=subject, datatype="anat", suffix="T1w", extension=[".nii", ".nii.gz"],
                 return_type="filename")
    candidates = []
    if session is not None:
        candidates = layout.get(session=session, **query)
    if not candidates:
        candidates = layout.get(session=None, **query) if session is not None else \
            layout.get(**query)
    if not candidates:
        return None
    if len(candidates) > 1:
        LOGGER.warning("sub-%s: %d T1w images, using %s", subject, len(candidates),
                       Path(sorted(candidates)[0]).name)
    return Path(sorted(candidates)[0])


def _header(path: Path | str):
    """The image header, or None when it cannot be read (the run's pre-flight check reports a
    broken image of the run itself; a broken partner is just not used)."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception:  # noqa: BLE001 - any unreadable file, whatever nibabel raises
        return None


def _same_grid(a: Path, b: Path) -> bool:
    import numpy as np

    img_a, img_b = _header(a), _header(b)
    return img_a is not None and img_b is not None and img_a.shape[:3] == img_b.shape[:3] \
        and np.allclose(img_a.affine, img_b.affine, atol=1e-3)


def _phase_encoding(layout, path: str) -> tuple[str | None, float | None]:
    from .sdc import readout_time

    meta = layout.get_metadata(path)
    direction = meta.get("PhaseEncodingDirection")
    if direction not in {"i", "j", "k", "i-", "j-", "k-"}:
        return None, None
    if meta.get("TotalReadoutTime"):
        return direction, readout_time(meta, ())
    img = _header(path)  # EffectiveEchoSpacing needs the matrix size along phase encoding
    return direction, None if img is None else readout_time(meta, img.shape)


def _intended_targets(values, subject_dir: Path, root: Path) -> set[Path]:
    """``IntendedFor`` entries as absolute paths: BIDS URIs into this dataset (``bids::``) and
    the older paths relative to the subject folder."""
    out = set()
    for value in [values] if isinstance(values, str) else list(values or []):
        value = str(value)
        if value.startswith("bids::"):
            out.add((root / value[len("bids::"):]).resolve())
        elif not value.startswith("bids:"):  # bids:<other dataset>: not ours
            out.add((subject_dir / value).resolve())
    return out


def _epis_for(layout, bids_file, entities: dict) -> list[Path]:
    """``fmap`` EPIs of the subject meant for this run, by ``IntendedFor`` or by a
    ``B0FieldSource`` of the run naming their ``B0FieldIdentifier``.

    Matched here rather than with ``BIDSLayout.get_fieldmap``, which (PyBIDS 0.22) fails on
    ``IntendedFor`` given as BIDS URIs, the form BIDS 1.9 recommends.
    """
    root = Path(layout.root)
    subject_dir = root / f"sub-{entities['subject']}"
    run_path = Path(bids_file.path).resolve()
    sources = layout.get_metadata(bids_file.path).get("B0FieldSource") or []
    sources = {sources} if isinstance(sources, str) else set(sources)
    found = []
    for epi in layout.get(subject=entities["subject"], datatype="fmap", suffix="epi",
                          extension=[".nii", ".nii.gz"]):
        meta = layout.get_metadata(epi.path)
        identifiers = meta.get("B0FieldIdentifier") or []
        identifiers = {identifiers} if isinstance(identifiers, str) else set(identifiers)
        if run_path in _intended_targets(meta.get("IntendedFor"), subject_dir, root) or \
                identifiers & sources:
            found.append(Path(epi.path))
    return sorted(found)


def _find_reverse_pe(layout, bids_file, entities: dict, direction: str) -> ReversePE | None:
    """The run's reversed phase-encoding partner on its grid: an ``fmap`` EPI meant for it
    (``IntendedFor``/``B0FieldIdentifier``), else another DWI run of the same session."""
    from .sdc import PhaseEncoding

    own = PhaseEncoding(direction)
    candidates = [(epi, None) for epi in _epis_for(layout, bids_file, entities)]
    n_epis = len(candidates)
    query = {"subject": entities["subject"], "datatype": "dwi", "suffix": "dwi",
             "extension": [".nii", ".nii.gz"], "session": entities.get("session")}
    for other in sorted(layout.get(**query), key=lambda f: f.path):
        if other.path != bids_file.path:
            candidates.append((Path(other.path), _companion(layout, other.path, "bval")))
    for index, (image, bval) in enumerate(candidates):
        pe, readout = _phase_encoding(layout, str(image))
        if pe is None or not PhaseEncoding(pe).is_reverse_of(own):
            continue
        if index >= n_epis and bval is None:  # its b=0 volumes cannot be told apart
            LOGGER.warning("%s has reversed phase encoding but no .bval; it is not used for "
                           "distortion correction", image.name)
            continue
        if not _same_grid(image, Path(bids_file.path)):
            LOGGER.warning("%s has reversed phase encoding but another grid than %s (or cannot "
                           "be read); it is not used for distortion correction", image.name,
                           Path(bids_file.path).name)
            continue
        return ReversePE(image=image, bval=bval, phase_encoding=pe, readout_time=readout)
    return None


def collect_runs(
    layout,
    *,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
    filters: dict | None = None,
    ignore_fieldmaps: bool = False,
) -> list[DwiRun]:
    """Every DWI run selected by labels and a ``--bids-filter-file`` ``dwi`` query, with its
    T1w and, where it has one, its reversed phase-encoding partner."""
    subjects = layout.get_subjects()
    wanted = [strip_prefix(s, "sub") for s in participant_labels or []]
    missing = sorted(set(wanted) - set(subjects))
    if missing:
        raise NothingSelectedError(
            f"participant label(s) {', '.join(missing)} not found; the dataset has: "
            f"{', '.join(f'sub-{s}' for s in subjects) or 'no subjects'}"
        )
    query = {"datatype": "dwi", "suffix": "dwi", "extension": [".nii", ".nii.gz"]}
    query.update((filters or {}).get("dwi", {}))
    if wanted:
        query["subject"] = wanted
    if session_labels:
        query["session"] = [strip_prefix(s, "ses") for s in session_labels]
    files = layout.get(**query)
    if not files:
        sessions = layout.get_sessions()
        raise NothingSelectedError(
            "no DWI run matches the selection; the dataset has subjects "
            f"{', '.join(f'sub-{s}' for s in subjects) or 'none'}"
            + (f" and sessions {', '.join(f'ses-{s}' for s in sessions)}" if sessions else "")
        )
    runs = []
    for bids_file in sorted(files, key=lambda f: f.path):
        ent = bids_file.get_entities()
        entities = {k: str(ent[k]) for k in RUN_ENTITIES if ent.get(k) is not None}
        sidecar = Path(bids_file.path.replace(".nii.gz", ".json").replace(".nii", ".json"))
        t1w = _find_t1w(layout, entities["subject"], entities.get("session"))
        direction, readout = _phase_encoding(layout, bids_file.path)
        reverse = None
        if t1w is not None and direction is not None and not ignore_fieldmaps:
            reverse = _find_reverse_pe(layout, bids_file, entities, direction)  # for the target
        runs.append(DwiRun(
            entities=entities,
            dwi=Path(bids_file.path),
            bval=_companion(layout, bids_file.path, "bval"),
            bvec=_companion(layout, bids_file.path, "bvec"),
            t1w=t1w,
            sidecar=sidecar if sidecar.exists() else None,
            phase_encoding=direction,
            readout_time=readout,
            reverse_pe=reverse,
        ))
    return runs


# --------------------------------------------------------------------------- output dataset


def write_dataset_description(output_dir: Path, bids_dir: Path) -> None:
    """The derivative ``dataset_description.json`` and ``.bidsignore`` (SPEC §8)."""
    output_dir = Path(output_dir)
    container = {"Type": "docker"} if Path("/.dockerenv").exists() else None
    generated = {"Name": "bids-deepanat", "Version": __version__,
                 "CodeURL": "https://github.com/bids-deepanat/bids-deepanat"}
    if container:
        generated["Container"] = container
    description = {
        "Name": "bids-deepanat: T1w images synthesized from diffusion MRI",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [{"URL": "bids:raw:"}],
        "DatasetLinks": {"raw": Path(bids_dir).resolve().as_uri()},
        "HowToAcknowledge": "Cite Li et al., Medical Image Analysis 86:102744 (2023); see "
                            "logs/CITATION.md.",
    }
    write_json_atomic(description, output_dir / "dataset_description.json")
    # Scalar diffusion maps (_dwimap, BEP016), transforms (_xfm, BEP014) and per-run metrics have
    # no released BIDS names yet; the validator honours .bidsignore.
    write_text_atomic("*_dwimap.*\n*_metrics.*\n*_xfm.*\nlogs\nwork\ngroup\n",
                      output_dir / ".bidsignore")


CITATION = """\
# Methods

T1-weighted images were synthesized from diffusion MRI with bids-deepanat {version}, an
implementation of DeepAnat [1] as a BIDS App. For each diffusion run, the mean b=0 image, the
mean diffusion-weighted image, the three eigenvalues of the diffusion tensor (weighted least
squares fit, DIPY [2]) and six diffusion-weighted images synthesized from the tensor along
fixed directions at b = 1000 s/mm² were computed in RAS+ voxel order, normalized within an
automatically computed brain mask, and given to a 3D U-Net that predicts the T1w image.
Where an acquired T1w image was available, it was registered rigidly to the mean b=0 image by
mutual information (DIPY) and resampled onto the diffusion grid as a training target. The
workflow was built with Nipype [3]; the dataset was queried with PyBIDS [4].

# References

1. Li Z, Fan Q, Bilgic B, et al. Diffusion MRI data analysis assisted by deep learning
   synthesized anatomical images (DeepAnat). Medical Image Analysis 86:102744 (2023).
2. Garyfallidis E, Brett M, Amirbekian B, et al. DIPY, a library for the analysis of diffusion
   MRI data. Frontiers in Neuroinformatics 8:8 (2014).
3. Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and extensible
   neuroimaging data processing framework in Python. Frontiers in Neuroinformatics 5:13 (2011).
4. Yarkoni T, Markiewicz CJ, de la Vega A, et al. PyBIDS: Python tools for BIDS datasets.
   Journal of Open Source Software 4(40):1294 (2019).
"""


def write_citation(output_dir: Path) -> Path:
    """``logs/CITATION.md``: a methods paragraph with references for papers (SPEC §8)."""
    return write_text_atomic(CITATION.format(version=__version__),
                             Path(output_dir) / "logs" / "CITATION.md")
