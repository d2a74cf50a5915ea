"""All derivative writing (SPEC §8): names from :func:`bids_deepanat.bids.derivative_path`."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import DwiRun, bids_uri, derivative_path
from ..dmri import CHANNELS
from ..interfaces.bids import DerivativesSink

MAP_DESCRIPTIONS = {
    "meanb0": ("Mean of the b=0 volumes", "arbitrary"),
    "meandwi": ("Mean of the diffusion-weighted volumes used for the tensor fit", "arbitrary"),
    "L1": ("Largest eigenvalue of the diffusion tensor (DIPY WLS fit)", "um^2/ms"),
    "L2": ("Middle eigenvalue of the diffusion tensor (DIPY WLS fit)", "um^2/ms"),
    "L3": ("Smallest eigenvalue of the diffusion tensor (DIPY WLS fit)", "um^2/ms"),
    **{
        f"dwi{k}": (f"DWI synthesized from the tensor at b=1000 s/mm^2 along DSM6 direction {k}",
                    "arbitrary")
        for k in range(1, 7)
    },
}


def run_sources(run: DwiRun, bids_dir: Path) -> list[str]:
    return [bids_uri(p, bids_dir) for p in (run.dwi, run.bval, run.bvec) if p is not None]


def mask_output(run: DwiRun, bids_dir: Path, *, automatic: bool) -> tuple[Path, dict]:
    return derivative_path(run, datatype="dwi", desc="brain", suffix="mask"), {
        "Type": "Brain",
        "Description": "Brain mask in diffusion space"
                       + (" from the mean b=0 image (DIPY median_otsu)" if automatic else
                          " given by the user"),
        "Sources": run_sources(run, bids_dir),
        "SpatialReference": bids_uri(run.dwi, bids_dir),
    }


def map_outputs(run: DwiRun, bids_dir: Path) -> list[tuple[Path, dict]]:
    outputs = []
    for channel in CHANNELS:
        description, units = MAP_DESCRIPTIONS[channel]
        outputs.append((derivative_path(run, datatype="dwi", desc=channel, suffix="dwimap"), {
            "Description": description,
            "Units": units,
            "SkullStripped": channel not in ("meanb0", "meandwi"),
            "Sources": run_sources(run, bids_dir),
            "SpatialReference": bids_uri(run.dwi, bids_dir),
        }))
    return outputs


def synth_output(run: DwiRun, bids_dir: Path, processing: dict) -> tuple[Path, dict]:
    return derivative_path(run, datatype="anat", desc="synth", suffix="T1w"), {
        "Description": "T1-weighted image synthesized from diffusion MRI by a 3D U-Net "
                       "(DeepAnat, Li et al. 2023), on the DWI grid",
        "SkullStripped": True,
        "Sources": run_sources(run, bids_dir),
        "SpatialReference": bids_uri(run.dwi, bids_dir),
        "ProcessingSettings": processing,
    }


def writes_fieldmap(run: DwiRun) -> bool:
    """A field in Hz needs the reversed-PE partner and the run's readout time."""
    return run.t1w is not None and run.reverse_pe is not None and bool(run.readout_time)


def target_paths(run: DwiRun) -> dict[str, Path]:
    """The registered T1w, its transform and the synthesis metrics of a run with a T1w, and
    the distortion field where a reversed phase-encoding pair gave one."""
    paths = {
        "target": derivative_path(run, datatype="anat", desc="target", suffix="T1w"),
        "xfm": derivative_path(run, datatype="anat", suffix="xfm", extension=".txt", space=None,
                               transform=("T1w", "dwi")),
        "metrics": derivative_path(run, datatype="anat", desc="synth", suffix="metrics",
                                   extension=".tsv"),
    }
    if writes_fieldmap(run):
        paths["fieldmap"] = derivative_path(run, datatype="fmap", desc="sdc", suffix="fieldmap")
        paths["magnitude"] = derivative_path(run, datatype="fmap", desc="sdc",
                                             suffix="magnitude")
    return paths


def target_outputs(run: DwiRun, bids_dir: Path) -> dict[str, tuple[Path, dict]]:
    """:func:`target_paths` with their sidecars."""
    sources = [bids_uri(run.t1w, bids_dir), *run_sources(run, bids_dir)]
    paths = target_paths(run)
    corrected = run.reverse_pe is not None
    if corrected:
        sources.append(bids_uri(run.reverse_pe.image, bids_dir))
    outputs = {
        "target": (paths["target"], {
            "Description": "Acquired T1w registered to the mean b=0 (DIPY mutual information) "
                           "and resampled onto the DWI grid: the training target"
                           + ("; registered to the b=0 undistorted with the reversed "
                              "phase-encoding pair, then mapped into the distorted DWI grid "
                              "so that it matches the diffusion maps voxel for voxel"
                              if corrected else ""),
            "SkullStripped": False,
            "Sources": sources,
            "SpatialReference": bids_uri(run.dwi, bids_dir),
        }),
        "xfm": (paths["xfm"], {
            "Description": "ITK affine transform that resamples the T1w onto the DWI grid "
                           "(maps DWI-space points to T1w-space points, as antsApplyTransforms "
                           "reads it with the DWI as reference)",
            "Sources": sources,
        }),
        "metrics": (paths["metrics"], {
            "Description": "Synthesized vs registered acquired T1w inside the brain mask, both "
                           "z-scored within the mask",
            **METRIC_DESCRIPTIONS,
        }),
    }
    if "fieldmap" in paths:
        outputs["fieldmap"] = (paths["fieldmap"], {
            "Description": "Off-resonance field estimated from the run's b=0 and its reversed "
                           "phase-encoding partner, on the DWI grid (a positive field displaces "
                           "signal in the direction of PhaseEncodingDirection)",
            "Units": "Hz",
            "SkullStripped": False,
            "PhaseEncodingDirection": run.phase_encoding,
            "TotalReadoutTime": run.readout_time,
            "Sources": [*run_sources(run, bids_dir), bids_uri(run.reverse_pe.image, bids_dir)],
            "SpatialReference": bids_uri(run.dwi, bids_dir),
        })
        outputs["magnitude"] = (paths["magnitude"], {
            "Description": "Mean of the run's b=0 and its reversed phase-encoding partner's, "
                           "both undistorted with the field: the field's reference image",
            "SkullStripped": False,
            "Sources": outputs["fieldmap"][1]["Sources"],
            "SpatialReference": bids_uri(run.dwi, bids_dir),
        })
    return outputs


METRIC_DESCRIPTIONS = {
    "mae": {"Description": "mean absolute error of the z-scores"},
    "mse": {"Description": "mean squared error of the z-scores"},
    "mse_rescaled": {"Description": "mean squared error after (z + 3) / 6, as DeepAnat reports"},
    "psnr": {"Description": "peak signal-to-noise ratio of the rescaled images", "Units": "dB"},
    "ssim": {"Description": "mean 3D structural similarity of the rescaled images"},
    "pearson_r": {"Description": "Pearson correlation of the z-scores"},
}


def saves_maps(run: DwiRun, save_maps: bool) -> bool:
    """Maps are written on request, and always where a target exists: training reads them."""
    return save_maps or run.t1w is not None


def expected_outputs(run: DwiRun, *, save_maps: bool, synthesize: bool) -> list[Path]:
    """Relative paths a complete participant-level run of ``run`` leaves behind."""
    paths = [derivative_path(run, datatype="dwi", desc="brain", suffix="mask")]
    if saves_maps(run, save_maps):
        paths += [derivative_path(run, datatype="dwi", desc=c, suffix="dwimap") for c in CHANNELS]
    if synthesize:
        paths.append(derivative_path(run, datatype="anat", desc="synth", suffix="T1w"))
    if run.t1w is not None:
        targets = target_paths(run)
        paths += [targets["target"], targets["xfm"]]
        if "fieldmap" in targets:
            paths += [targets["fieldmap"], targets["magnitude"]]
        if synthesize:
            paths.append(targets["metrics"])
    return paths


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name.split(".")[0] + ".json")


def is_complete(
    run: DwiRun, output_dir: Path, *, save_maps: bool, synthesize: bool, model_sha256: str | None,
    processing: dict,
) -> bool:
    """Whether a previous run left every output of ``run``, intact, for this model and settings.

    Outputs are written atomically, so a file under its final name is whole; the sidecar of the
    synthesized T1w records the model and the settings that made it.
    """
    import json

    for rel in expected_outputs(run, save_maps=save_maps, synthesize=synthesize):
        image = output_dir / rel
        if not (image.is_file() and sidecar_of(image).is_file()):
            return False
    if run.t1w is not None:
        # A target made with(out) distortion correction is stale when the partner is (not) used.
        try:
            meta = json.loads(sidecar_of(output_dir / target_paths(run)["target"]).read_text())
        except ValueError:
            return False
        corrected = "DistortionCorrection" in meta
        if corrected != (run.reverse_pe is not None):
            return False
        if corrected and not any(str(source).endswith("/" + run.reverse_pe.image.name)
                                 for source in meta.get("Sources", [])):
            return False  # another partner now
    if not synthesize:
        return True
    rel = derivative_path(run, datatype="anat", desc="synth", suffix="T1w")
    try:
        meta = json.loads(sidecar_of(output_dir / rel).read_text())
    except ValueError:
        return False
    return meta.get("ModelSHA256") == model_sha256 and meta.get("ProcessingSettings") == processing


def init_ds_dwi_maps_wf(
    *, run: DwiRun, bids_dir: Path, output_dir: Path, save_maps: bool, automatic_mask: bool,
    name: str = "ds_dwi_maps_wf",
) -> pe.Workflow:
    """Write the brain mask (always) and the 11 maps (``save_maps``) of one run.

    Inputs: ``map_files``, ``mask_file``, ``warnings``.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["map_files", "mask_file", "warnings"]),
                        name="inputnode")
    mask_path, mask_meta = mask_output(run, bids_dir, automatic=automatic_mask)
    ds_mask = pe.Node(
        DerivativesSink(base_directory=str(output_dir), out_paths=[str(mask_path)],
                        metadata=[mask_meta]),
        name="ds_mask", run_without_submitting=True,
    )
    workflow.connect([(inputnode, ds_mask, [("mask_file", "in_files"),
                                            ("warnings", "warnings")])])
    if save_maps:
        paths, metadata = zip(*map_outputs(run, bids_dir))
        ds_maps = pe.Node(
            DerivativesSink(base_directory=str(output_dir), out_paths=[str(p) for p in paths],
                            metadata=list(metadata)),
            name="ds_maps", run_without_submitting=True,
        )
        workflow.connect([(inputnode, ds_maps, [("map_files", "in_files"),
                                                ("warnings", "warnings")])])
    return workflow


def init_ds_synth_wf(
    *, run: DwiRun, bids_dir: Path, output_dir: Path, processing: dict,
    name: str = "ds_synth_wf",
) -> pe.Workflow:
    """Write the synthesized T1w of one run into ``anat/`` with its sidecar.

    Inputs: ``synth_file``, ``metadata`` (from the synthesis node), ``warnings``.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["synth_file", "metadata", "warnings"]),
                        name="inputnode")
    path, meta = synth_output(run, bids_dir, processing)
    ds_synth = pe.Node(
        DerivativesSink(base_directory=str(output_dir), out_paths=[str(path)], metadata=[meta]),
        name="ds_synth", run_without_submitting=True,
    )
    workflow.connect([(inputnode, ds_synth, [("synth_file", "in_files"),
                                             ("metadata", "extra_metadata"),
                                             ("warnings", "warnings")])])
    return workflow


def init_ds_target_wf(
    *, run: DwiRun, bids_dir: Path, output_dir: Path, with_metrics: bool,
    name: str = "ds_target_wf",
) -> pe.Workflow:
    """Write the registered T1w, its transform and (``with_metrics``) the metrics TSV.

    Inputs: ``target_file``, ``xfm_file``, ``registration`` (metadata), ``metrics_file``,
    ``fieldmap_file`` and ``magnitude_file`` (written where :func:`writes_fieldmap`).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["target_file", "xfm_file", "registration", "metrics_file", "fieldmap_file",
                "magnitude_file"]), name="inputnode")
    outputs = target_outputs(run, bids_dir)
    ds_target = pe.Node(DerivativesSink(
        base_directory=str(output_dir), out_paths=[str(outputs["target"][0])],
        metadata=[outputs["target"][1]]), name="ds_target", run_without_submitting=True)
    ds_xfm = pe.Node(DerivativesSink(
        base_directory=str(output_dir), out_paths=[str(outputs["xfm"][0])],
        metadata=[outputs["xfm"][1]]), name="ds_xfm", run_without_submitting=True)
    workflow.connect([
        (inputnode, ds_target, [("target_file", "in_files"),
                                ("registration", "extra_metadata")]),
        (inputnode, ds_xfm, [("xfm_file", "in_files")]),
    ])
    if with_metrics:
        ds_metrics = pe.Node(DerivativesSink(
            base_directory=str(output_dir), out_paths=[str(outputs["metrics"][0])],
            metadata=[outputs["metrics"][1]]), name="ds_metrics", run_without_submitting=True)
        workflow.connect([(inputnode, ds_metrics, [("metrics_file", "in_files")])])
    if "fieldmap" in outputs:
        ds_fieldmap = pe.Node(DerivativesSink(
            base_directory=str(output_dir),
            out_paths=[str(outputs["fieldmap"][0]), str(outputs["magnitude"][0])],
            metadata=[outputs["fieldmap"][1], outputs["magnitude"][1]]),
            name="ds_fieldmap", run_without_submitting=True)
        merge = pe.Node(niu.Merge(2), name="fieldmap_files", run_without_submitting=True)
        workflow.connect([
            (inputnode, merge, [("fieldmap_file", "in1"), ("magnitude_file", "in2")]),
            (merge, ds_fieldmap, [("out", "in_files")]),
        ])
    return workflow
